//! The SVG plot of `bench --plot` (feature `cli`: plotters is a dependency of the binary's
//! features only).

use std::path::Path;

use super::{BenchReport, BenchRun};
use crate::error::{Error, Result};

/// Largest over smallest step latency of the plotted runs above which the y axis is
/// logarithmic.
pub const LOG_Y_RATIO: f64 = 20.0;

/// Writes an SVG plot of the per-step latency (ms) of the dense run and the all-on sparse run
/// of `report` to `path`: step on x, latency on y (logarithmic when the largest over the
/// smallest step exceeds [`LOG_Y_RATIO`]), titled with the device and the workload.
pub fn plot_steps_svg(report: &BenchReport, path: &Path) -> Result<()> {
    let (Some(dense), Some(sparse)) = (report.dense(), report.sparse_all_on()) else {
        return Err(Error::Input(
            "plot: the report needs a dense and an all-on sparse run".into(),
        ));
    };
    let svg = render_steps_svg(report, dense, sparse)
        .map_err(|e| Error::io(path, std::io::Error::other(format!("plotting: {e}"))))?;
    crate::io::write_atomic(path, |w| {
        w.write_all(svg.as_bytes()).map_err(|e| Error::io(path, e))
    })
}

type Series<'a> = (&'a str, Vec<(i32, f64)>, plotters::style::RGBColor);

/// Mesh, curves and legend of the per-step plot, for either y axis (linear or log).
fn draw_steps<'a, DB, Y>(
    mut c: plotters::chart::ChartContext<
        'a,
        DB,
        plotters::coord::cartesian::Cartesian2d<plotters::coord::types::RangedCoordi32, Y>,
    >,
    y_desc: &str,
    series: &[Series],
) -> std::result::Result<(), String>
where
    DB: plotters::prelude::DrawingBackend + 'a,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>
        + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    use plotters::prelude::*;
    c.configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, pts, color) in series {
        let color = *color;
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

fn render_steps_svg(
    report: &BenchReport,
    dense: &BenchRun,
    sparse: &BenchRun,
) -> std::result::Result<String, String> {
    use plotters::prelude::*;
    // Latencies in ms, floored at 1 ns so that a log axis has a positive range.
    let points = |r: &BenchRun| -> Vec<(i32, f64)> {
        (r.step_s.iter().enumerate())
            .map(|(k, &s)| (k as i32, (s * 1e3).max(1e-6)))
            .collect()
    };
    let series: Vec<Series> = vec![
        ("dense", points(dense), RGBColor(214, 39, 40)),
        ("sparse (all on)", points(sparse), RGBColor(31, 119, 180)),
    ];
    let all = || {
        series
            .iter()
            .flat_map(|(_, p, _)| p.iter().map(|&(_, y)| y))
    };
    let lo = all().fold(f64::INFINITY, f64::min);
    let hi = all().fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (lo, hi)
    } else {
        (1e-3, 1.0)
    };
    let steps = series.iter().map(|(_, p, _)| p.len()).max().unwrap_or(0);
    let x = 0i32..(steps.max(2) as i32 - 1);
    let title = format!("{}: per-step latency, dense vs sparse", report.device);
    let caption = format!("{} ({})", report.workload, report.step_clock);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(&title, ("sans-serif", 22))
            .map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root);
        chart
            .caption(&caption, ("sans-serif", 13))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70);
        if hi / lo > LOG_Y_RATIO {
            // Headroom above the curves for the legend (upper right).
            let c = chart
                .build_cartesian_2d(x, (lo / 1.5..hi * 4.0).log_scale())
                .map_err(|e| e.to_string())?;
            draw_steps(c, "step latency (ms, log scale)", &series)?;
        } else {
            let c = chart
                .build_cartesian_2d(x, 0.0..hi * 1.3)
                .map_err(|e| e.to_string())?;
            draw_steps(c, "step latency (ms)", &series)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Writes an SVG plot of a `bench --batch` report to `path`, three panels against the batch
/// size (log scale): images or tokens per second, the per-request latency (the batch's wall
/// time, s) and the median step latency (ms), dense and all-on sparse, titled with the device
/// and the workload.
pub fn plot_batch_svg(report: &super::BatchReport, path: &Path) -> Result<()> {
    let svg = render_batch_svg(report)
        .map_err(|e| Error::io(path, std::io::Error::other(format!("plotting: {e}"))))?;
    crate::io::write_atomic(path, |w| {
        w.write_all(svg.as_bytes()).map_err(|e| Error::io(path, e))
    })
}

fn render_batch_svg(report: &super::BatchReport) -> std::result::Result<String, String> {
    use plotters::prelude::*;
    type Pick = fn(&super::BatchRun) -> f64;
    let panels: [(&str, Pick); 3] = [
        ("throughput", |r| r.items_per_s),
        ("latency per request (s)", |r| r.wall_s),
        ("median step (ms)", |r| r.step_median_s * 1e3),
    ];
    let series = [
        ("dense", RGBColor(214, 39, 40)),
        ("sparse (all on)", RGBColor(31, 119, 180)),
    ];
    let runs = [report.series("dense"), report.series("sparse")];
    let batches: Vec<f64> = (runs.iter().flatten()).map(|r| r.batch as f64).collect();
    let bmax = batches.iter().copied().fold(1.0, f64::max);
    let title = format!(
        "{}: {} per second, latency and step time vs batch size",
        report.device, report.items
    );
    let caption = format!("{} ({})", report.workload, report.step_clock);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1500, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(&title, ("sans-serif", 22))
            .map_err(|e| e.to_string())?;
        let root = root
            .titled(&caption, ("sans-serif", 13))
            .map_err(|e| e.to_string())?;
        for (area, (name, pick)) in root.split_evenly((1, 3)).iter().zip(panels) {
            let values = (runs.iter().flatten()).map(|r| pick(r));
            let hi = values.fold(0.0, f64::max).max(1e-9);
            let y_desc = if name == "throughput" {
                format!("{} per second", report.items)
            } else {
                name.to_string()
            };
            let mut c = ChartBuilder::on(area)
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((1.0..bmax * 1.2).log_scale(), 0.0..hi * 1.25)
                .map_err(|e| e.to_string())?;
            c.configure_mesh()
                .x_desc("batch size (log scale)")
                .y_desc(y_desc)
                .draw()
                .map_err(|e| e.to_string())?;
            for ((label, color), rs) in series.iter().zip(&runs) {
                let color = *color;
                let pts: Vec<(f64, f64)> = rs.iter().map(|r| (r.batch as f64, pick(r))).collect();
                c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
                c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{FLOOR_RULE, GEMM_RULE, median, percentile};
    use crate::sampler::Execution;

    fn run(mode: &str, all_on: bool, steps: &[f64]) -> BenchRun {
        BenchRun {
            mode: mode.into(),
            cache_prompt: all_on,
            cache_decoded: all_on,
            truncate: all_on,
            execution: Execution::Eager,
            wall_s: steps.iter().sum(),
            setup_s: 0.0,
            run_s: steps.iter().sum(),
            forwards: steps.len(),
            mean_rows: 1.0,
            rows_fed: steps.len(),
            step_median_s: median(steps),
            step_p90_s: percentile(steps, 90.0),
            step_s: steps.to_vec(),
            peak_device_bytes: None,
            tokens_match_sparse: None,
            tokens: Vec::new(),
            product_flops_per_s: None,
        }
    }

    fn report(dense: &[f64], sparse: &[f64]) -> BenchReport {
        BenchReport {
            backend: "test".into(),
            device: "Test Card".into(),
            driver: None,
            preset: "tiny".into(),
            machine: "host".into(),
            workload: "t2i 4x4 <&> test".into(),
            step_clock: "wall".into(),
            runs: vec![run("dense", false, dense), run("sparse", true, sparse)],
            speedup_sparse_vs_dense: 1.0,
            speedup_run_sparse_vs_dense: 1.0,
            speedup_step_median_sparse_vs_dense: 1.0,
            memory_source: None,
            resident_device_bytes: None,
            copy_bandwidth_bytes_per_s: None,
            copy_bytes: None,
            floor_rule: FLOOR_RULE.into(),
            active_weight_params: 0,
            active_weight_bytes: None,
            floor_step_s: None,
            sparse_step_over_floor: None,
            gemm_rule: GEMM_RULE.into(),
            bf16_peak_flops_per_s: None,
            dense_gemm_flops_per_s: None,
            dense_gemm_fraction_of_peak: None,
            cpu_sgemm_flops_per_s: None,
            peer: None,
            vs_peer: Vec::new(),
        }
    }

    /// Both axis kinds render a well-formed SVG with one polyline per run, the title naming
    /// the card and the workload (escaped), and "log scale" exactly when the gap is large.
    #[test]
    fn plot_is_an_svg_with_both_runs_linear_or_log() {
        let dir = tempfile::tempdir().unwrap();
        for (sparse, log) in [(vec![0.5, 0.6, 0.4, 0.5], false), (vec![0.001; 4], true)] {
            let r = report(&[1.0, 1.1, 0.9, 1.0], &sparse);
            let path = dir.path().join("p.svg");
            plot_steps_svg(&r, &path).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(svg.matches("<polyline").count() >= 2, "{svg}");
            assert!(svg.contains("Test Card: per-step latency"));
            assert!(svg.contains("t2i 4x4 &lt;&amp;&gt; test"), "{svg}");
            assert_eq!(svg.contains("log scale"), log);
        }
        let mut r = report(&[1.0], &[1.0]);
        r.runs.pop();
        let e = plot_steps_svg(&r, &dir.path().join("q.svg")).unwrap_err();
        assert!(e.to_string().contains("all-on sparse"), "{e}");
    }
}
