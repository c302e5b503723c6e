//! What the side-by-side benches share (`nft_apply`, `daemon`): one case per child
//! process with its namespaces removed afterwards, quantiles, the load average, the
//! output directory and SVG plots over the cluster size.
// Each including bench uses a different part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::netns;

pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of `v`, nearest rank.
pub(crate) fn pct(v: &mut [Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

pub(crate) fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn out_dir() -> PathBuf {
    std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-maps"))
}

/// Runs this executable again with `env` set (one case in a child process), with SIGINT
/// ignored here meanwhile, and removes the namespaces the child left (named after its
/// pid). Returns whether it succeeded, and its stdout.
pub(crate) fn run_child(env: (&str, String)) -> (bool, String) {
    let exe = std::env::current_exe().expect("own path");
    // SAFETY: setting a signal disposition; the child resets it (see `child_init`).
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let child = Command::new(exe)
        .env(env.0, env.1)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("child");
    let pid = child.id();
    let out = child.wait_with_output().expect("child");
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    remove_namespaces_of(pid);
    let interrupted = {
        use std::os::unix::process::ExitStatusExt;
        out.status.signal() == Some(libc::SIGINT)
    };
    if interrupted {
        eprintln!("interrupted");
        std::process::exit(130);
    }
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// In a child: SIGINT back to its default (the parent ignores it while the child runs).
pub(crate) fn child_init() {
    // SAFETY: setting a signal disposition.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

fn remove_namespaces_of(pid: u32) {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let prefix = format!("{}{pid}-", netns::PREFIX);
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            let _ = netns::run_checked(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

const COLORS: [plotters::style::RGBColor; 4] = [
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(148, 103, 189),
];

/// One series of a plot: a label and its points (x: Services); `timeouts` are drawn as
/// hollow triangles at the bound (the real value is above it).
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) points: Vec<(f64, f64)>,
    pub(crate) timeouts: Vec<(f64, f64)>,
}

/// One plot over the cluster size, log-scaled x (and y when `log_y`), a line per series.
pub(crate) fn plot(
    path: &Path,
    series: &[Series],
    title: &str,
    y_desc: &str,
    log_y: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().chain(&s.timeouts).copied())
        .filter(|p| p.1 > 0.0)
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let x_min = all.iter().map(|p| p.0).fold(f64::MAX, f64::min) * 0.8;
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max) * 1.25;
    let y_lo = all.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let y_hi = all.iter().map(|p| p.1).fold(1e-3, f64::max);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("Services (× 10 endpoints)")
                .y_desc(y_desc)
                .x_label_formatter(&|x| size_label(*x))
                .y_label_formatter(&|y| value_label(*y))
                .draw()?;
            for (s, color) in series.iter().zip(COLORS.iter().cycle()) {
                let color = *color;
                let mut pts: Vec<(f64, f64)> =
                    s.points.iter().copied().filter(|p| p.1 > 0.0).collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                if pts.is_empty() && s.timeouts.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
                chart.draw_series(
                    s.timeouts
                        .iter()
                        .map(|p| TriangleMarker::new(*p, 7, color.stroke_width(2))),
                )?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
        }};
    }
    if log_y {
        let (lo, hi) = (y_lo.max(1e-3) * 0.5, y_hi * 2.0);
        draw!(builder.build_cartesian_2d((x_min..x_max).log_scale(), (lo..hi).log_scale())?);
    } else {
        draw!(builder.build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_hi * 1.3)?);
    }
    root.present()?;
    Ok(())
}

/// An x-axis label: "1k", "3k", "10k", "30k", … for the round sizes, nothing for the
/// intermediate marks of a log axis.
fn size_label(x: f64) -> String {
    let k = x / 1000.0;
    let round = [0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0];
    match round.iter().find(|r| (k - **r).abs() < 1e-6) {
        Some(r) if *r < 1.0 => format!("{}", r * 1000.0),
        Some(r) => format!("{r}k"),
        None => String::new(),
    }
}

/// A y-axis label without trailing zeros.
fn value_label(y: f64) -> String {
    if y >= 10.0 {
        format!("{y:.0}")
    } else {
        let s = format!("{y:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A CSV cell: the value with `prec` decimals, empty when there is none.
pub(crate) fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}")).unwrap_or_default()
}
