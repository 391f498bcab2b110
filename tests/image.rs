//! `--image`: the PNG of a t2i generation, decoded and checked against the generation's trace.

use sparse_lavida::image::PictureLayout;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparse-lavida"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A decoded 8-bit RGB PNG: width, height, pixels, text chunks.
struct Decoded {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
    text: String,
}

impl Decoded {
    fn read(path: &Path) -> Decoded {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        rgb.truncate(info.buffer_size());
        let text = reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .map(|t| format!("{}: {}", t.keyword, t.text))
            .collect();
        Decoded {
            width: info.width as usize,
            height: info.height as usize,
            rgb,
            text,
        }
    }

    fn at(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
}

/// Per cell (row-major): (decode step, token) from a trace's steps.
fn cells_of(trace: &serde_json::Value, n: usize) -> Vec<(usize, u64)> {
    let mut cells = vec![(usize::MAX, 0); n];
    for (k, s) in trace["steps"].as_array().unwrap().iter().enumerate() {
        let pos = s["decoded_positions"].as_array().unwrap();
        let tok = s["tokens"].as_array().unwrap();
        for (p, t) in pos.iter().zip(tok) {
            cells[p.as_u64().unwrap() as usize] = (k, t.as_u64().unwrap());
        }
    }
    assert!(cells.iter().all(|c| c.0 != usize::MAX));
    cells
}

#[test]
fn the_picture_shows_each_cells_decode_step_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let (trace, png_path) = (dir.path().join("t.json"), dir.path().join("g.png"));
    let (h, w) = (6, 10);
    ok(&cli(&[
        "generate",
        "--preset",
        "tiny",
        "--grid",
        "6x10",
        "--steps",
        "7",
        "--trace",
        trace.to_str().unwrap(),
        "--image",
        png_path.to_str().unwrap(),
    ]));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(t["grid"], serde_json::json!([h, w]));
    assert_eq!(t["vocab"], 64);
    let cells = cells_of(&t, h * w);

    let img = Decoded::read(&png_path);
    let l = PictureLayout::of(h, w).unwrap();
    assert_eq!(
        (img.width, img.height),
        (2 * w * l.scale + l.gap, h * l.scale)
    );
    assert_eq!((l.width_px, l.height_px), (img.width, img.height));
    assert!(
        img.text.contains("grid 6x10") && img.text.contains("7 steps"),
        "{}",
        img.text
    );

    // Sample every pixel of every cell in both panels: a cell is one colour, the step map's
    // colour is a function of the step and tells steps apart, the token map's is a function of
    // the token.
    let mut step_colour: HashMap<usize, [u8; 3]> = HashMap::new();
    let mut token_colour: HashMap<u64, [u8; 3]> = HashMap::new();
    let right = w * l.scale + l.gap;
    for (c, &(step, token)) in cells.iter().enumerate() {
        let (cy, cx) = (c / w, c % w);
        for dy in 0..l.scale {
            for dx in 0..l.scale {
                let (x, y) = (cx * l.scale + dx, cy * l.scale + dy);
                let s = img.at(x, y);
                assert_eq!(
                    *step_colour.entry(step).or_insert(s),
                    s,
                    "cell {c} step {step}"
                );
                let t = img.at(right + x, y);
                assert_eq!(
                    *token_colour.entry(token).or_insert(t),
                    t,
                    "cell {c} token {token}"
                );
            }
        }
    }
    assert_eq!(step_colour.len(), 7);
    let distinct: std::collections::HashSet<[u8; 3]> = step_colour.values().copied().collect();
    assert_eq!(distinct.len(), 7, "each step its own colour");
    // Decode order from the step map: step 0 is the darkest (viridis starts dark purple).
    let luma = |c: [u8; 3]| c.iter().map(|&v| v as u32).sum::<u32>();
    assert!(luma(step_colour[&0]) < luma(step_colour[&6]));
    // The gap between the panels is white.
    for y in 0..img.height {
        for x in w * l.scale..right {
            assert_eq!(img.at(x, y), [255, 255, 255]);
        }
    }

    // `render` draws the same picture from the trace file.
    let again = dir.path().join("again.png");
    ok(&cli(&[
        "render",
        "--trace",
        trace.to_str().unwrap(),
        "--image",
        again.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&png_path).unwrap()
    );
}

#[test]
fn bench_draws_the_sparse_run_and_render_refuses_a_text_trace() {
    let dir = tempfile::tempdir().unwrap();
    let png_path = dir.path().join("b.png");
    ok(&cli(&[
        "bench",
        "--preset",
        "tiny",
        "--grid",
        "4x4",
        "--steps",
        "4",
        "--image",
        png_path.to_str().unwrap(),
    ]));
    let img = Decoded::read(&png_path);
    let l = PictureLayout::of(4, 4).unwrap();
    assert_eq!((img.width, img.height), (l.width_px, l.height_px));

    let trace = dir.path().join("text.json");
    ok(&cli(&[
        "generate",
        "--preset",
        "tiny",
        "--task",
        "text",
        "--answer-len",
        "8",
        "--trace",
        trace.to_str().unwrap(),
    ]));
    let o = cli(&[
        "render",
        "--trace",
        trace.to_str().unwrap(),
        "--image",
        dir.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not the trace of a t2i generation"));
}

#[test]
fn layout_scales_small_grids_up_and_refuses_impossible_ones() {
    let l = PictureLayout::of(32, 32).unwrap();
    assert_eq!((l.scale, l.width_px, l.height_px), (8, 2 * 32 * 8 + 8, 256));
    assert_eq!(PictureLayout::of(2, 3).unwrap().scale, 16);
    assert_eq!(PictureLayout::of(1000, 1).unwrap().scale, 1);
    assert!(PictureLayout::of(0, 3).is_err());
    assert!(PictureLayout::of(1, usize::MAX / 2).is_err());
}
