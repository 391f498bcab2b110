//! The emulated device itself (`kernels/emu`): its instructions do what the CUDA documentation
//! says, and every break of a CUDA rule it is there to catch is reported — naming the kernel,
//! block and thread — rather than hanging or computing something. Its test kernels
//! (`kernels/emu/selftest.cu`) exist only in the emulated device, so these tests need it: they run
//! with the `emulator` feature (`./scripts/test`) and are ignored otherwise.
//!
//! A kernel fault makes the context's error sticky (on a GPU as on the emulator), so each
//! faulting kernel runs in a child process: this test binary again, running `child` with the
//! kernel's name in `SL_EMU_SELFTEST`.

#![cfg(feature = "cuda")]

mod common;

use std::ffi::{CString, c_void};
use std::process::Command;

use cudarc::driver::{CudaSlice, DevicePtr, DriverError, result, sys};
use sparse_lavida::cuda::device::CudaDevice;

/// The emulator's test kernels, as a PTX-like image: the emulated driver loads a module by its
/// `.entry` names.
const IMAGE: &str = ".version 8.0\n.target sm_90\n\
    .entry sl_emu_selftest_partial_barrier(\n\
    .entry sl_emu_selftest_divergent_shuffle(\n\
    .entry sl_emu_selftest_mismatched_collectives(\n\
    .entry sl_emu_selftest_shared_before_write(\n\
    .entry sl_emu_selftest_cp_async(\n\
    .entry sl_emu_selftest_cp_async_out_of_window(\n\
    .entry sl_emu_selftest_warp_ops(\n\
    .entry sl_emu_selftest_barrier_reductions(\n";

fn device() -> CudaDevice {
    let dev = CudaDevice::new(0).unwrap_or_else(|e| panic!("{}: {e}", common::NEED_DEVICE));
    assert!(
        dev.info().emulated,
        "these tests need the emulated device (its test kernels)"
    );
    dev
}

/// Launches test kernel `name` with one block of `threads`, `smem` bytes of dynamic shared
/// memory and the given pointer arguments, and waits for it.
fn launch(
    dev: &CudaDevice,
    name: &str,
    threads: u32,
    smem: u32,
    args: &[u64],
) -> Result<(), DriverError> {
    let image = CString::new(IMAGE).unwrap();
    // SAFETY: the image is a NUL-terminated string that outlives the call.
    let module = unsafe { result::module::load_data(image.as_ptr().cast()) }?;
    let cname = CString::new(name).unwrap();
    // SAFETY: `module` was just loaded and is alive.
    let func = unsafe { result::module::get_function(module, cname) }?;
    let mut values: Vec<u64> = args.to_vec();
    let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| (v as *mut u64).cast()).collect();
    // SAFETY: every test kernel takes device pointers (u64) matching `args`, and the buffers
    // they point to outlive the synchronisation below.
    unsafe {
        result::launch_kernel(
            func,
            (1, 1, 1),
            (threads, 1, 1),
            smem,
            dev.stream().cu_stream(),
            &mut params,
        )
    }?;
    dev.stream().synchronize()
}

fn ptr<T>(dev: &CudaDevice, buf: &CudaSlice<T>) -> u64 {
    let (p, _guard) = buf.device_ptr(dev.stream());
    p
}

/// The entry point of the child processes (see the module docs); does nothing elsewhere.
#[test]
#[ignore = "run by the other tests of this file, in a child process"]
fn child() {
    let Ok(name) = std::env::var("SL_EMU_SELFTEST") else {
        return;
    };
    let dev = device();
    let out = dev.alloc_zeros::<u32>(256).unwrap();
    let src = dev.upload(&[7u32; 64]).unwrap();
    let args = [ptr(&dev, &out), ptr(&dev, &src)];
    let result = launch(&dev, &name, 64, 4096, &args);
    println!("child result: {result:?}");
}

/// Runs faulting kernel `name` in a child process; returns its stderr and stdout.
fn run_child(name: &str) -> (String, String) {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--include-ignored", "--nocapture"])
        .env("SL_EMU_SELFTEST", name)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&o.stderr).into_owned(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs the emulated device")]
fn rule_breaks_are_reported_naming_kernel_block_and_thread() {
    for (kernel, needles) in [
        (
            "sl_emu_selftest_partial_barrier",
            &[
                "thread (5,0,0)",
                "a barrier must be reached by every thread",
            ][..],
        ),
        (
            "sl_emu_selftest_divergent_shuffle",
            // Which side is found first depends on the schedule: a lane of the mask at the
            // barrier, or the barrier reached while lanes wait at the shuffle.
            &["__shfl_xor_sync", "barrier"][..],
        ),
        (
            "sl_emu_selftest_mismatched_collectives",
            &["different collectives", "__ballot_sync", "__shfl_xor_sync"][..],
        ),
        (
            "sl_emu_selftest_cp_async_out_of_window",
            &[
                "cp.async",
                "outside the block's 4096 bytes of dynamic shared memory",
            ][..],
        ),
    ] {
        let (err, out) = run_child(kernel);
        assert!(
            err.contains(&format!(
                "sparse-lavida emulated device: {kernel} block (0,0,0) thread ("
            )),
            "{kernel}: no report naming the kernel, block and thread:\n{err}"
        );
        for n in needles {
            assert!(err.contains(n), "{kernel}: the report lacks `{n}`:\n{err}");
        }
        assert!(
            out.contains("child result: Err(DriverError(CUDA_ERROR_LAUNCH_FAILED"),
            "{kernel}: the launch did not fail:\n{out}\n{err}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs the emulated device")]
fn an_unimplemented_driver_function_is_an_error_naming_it() {
    let _dev = device();
    let mut p = 0u64;
    // SAFETY: a valid out-pointer; the emulated driver does not implement managed memory.
    let rc = unsafe { sys::cuMemAllocManaged(&mut p, 64, 1) };
    assert_eq!(rc, sys::CUresult::CUDA_ERROR_NOT_SUPPORTED);
    // SAFETY: the driver library is loaded (a device is open); slEmuLastError takes no
    // arguments and returns a NUL-terminated string that stays valid until the next error.
    let message = unsafe {
        let f = sys::culib()
            .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"slEmuLastError\0")
            .unwrap();
        std::ffi::CStr::from_ptr(f()).to_string_lossy().into_owned()
    };
    assert!(
        message.contains("cuMemAllocManaged is not emulated"),
        "{message}"
    );
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs the emulated device")]
fn shared_memory_starts_as_garbage_and_cp_async_lands_at_its_wait() {
    let dev = device();
    let out = dev.upload(&[0u32; 256]).unwrap();
    launch(
        &dev,
        "sl_emu_selftest_shared_before_write",
        64,
        0,
        &[ptr(&dev, &out)],
    )
    .unwrap();
    let got = dev.download(&out).unwrap();
    assert!(got[..64].iter().all(|&w| w == u32::MAX), "{:?}", &got[..64]);

    // Thread t copies src[t] = four words 1000 t + 0..3.
    let src: Vec<u32> = (0..64 * 4).map(|i| 1000 * (i / 4) + i % 4).collect();
    let src = dev.upload(&src).unwrap();
    let out = dev.upload(&[0u32; 3 * 64]).unwrap();
    let args = [ptr(&dev, &out), ptr(&dev, &src)];
    launch(&dev, "sl_emu_selftest_cp_async", 64, 64 * 16, &args).unwrap();
    let got = dev.download(&out).unwrap();
    for t in 0..64 {
        let (issued, committed, waited) = (got[3 * t], got[3 * t + 1], got[3 * t + 2]);
        assert_eq!(
            issued,
            u32::MAX,
            "thread {t}: the data arrived before its wait"
        );
        assert_eq!(
            committed,
            u32::MAX,
            "thread {t}: the data arrived at the commit"
        );
        assert_eq!(waited, 1000 * t as u32, "thread {t}: after wait_group 0");
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs the emulated device")]
fn warp_collectives_and_barrier_reductions_follow_the_cuda_definitions() {
    let dev = device();
    let out = dev.upload(&[0u32; 256]).unwrap();
    launch(&dev, "sl_emu_selftest_warp_ops", 32, 0, &[ptr(&dev, &out)]).unwrap();
    let got = dev.download(&out).unwrap();
    let v = |lane: u32| 100 + lane;
    // The CUDA programming guide: a width-w shuffle works within segments of w lanes; up/down
    // beyond the segment and xor into a later segment give the caller's own value.
    let ballot: u32 = (0..32).filter(|l| l % 3 == 0).map(|l| 1u32 << l).sum();
    for lane in 0..32u32 {
        let seg = |w: u32| lane / w * w;
        let want = [
            v((lane * 7) % 32),
            v(seg(8) + (lane + 3) % 8),
            if lane >= 3 { v(lane - 3) } else { v(lane) },
            if lane % 8 >= 3 { v(lane - 3) } else { v(lane) },
            if lane % 16 + 5 < 16 {
                v(lane + 5)
            } else {
                v(lane)
            },
            {
                let src = lane ^ 6;
                if src >= seg(4) + 4 { v(lane) } else { v(src) }
            },
            ballot,
            v(lane ^ 17) ^ (1 << 20),
        ];
        assert_eq!(&got[8 * lane as usize..][..8], &want, "lane {lane}");
    }

    let out = dev.upload(&[0u32; 4]).unwrap();
    launch(
        &dev,
        "sl_emu_selftest_barrier_reductions",
        100,
        0,
        &[ptr(&dev, &out)],
    )
    .unwrap();
    let got = dev.download(&out).unwrap();
    assert_eq!(
        &got[..3],
        &[34, 1, 0],
        "count / or / and of t % 3 == 0 over 100 threads"
    );
}
