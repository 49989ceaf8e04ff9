//! Hand-written SVG charts: grouped bars with min–max whiskers, and lines with points.
//! No dependencies; the files open in any browser.

use std::fmt::Write as _;

use super::stats::{Stat, fmt};

/// One series: a mode, its colour, and one value per group (or x position).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub values: Vec<Option<Stat>>,
}

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 92.0;

/// Colours of the modes, in `Mode::ALL` order.
pub const PALETTE: [&str; 5] = ["#7f8c8d", "#2e86de", "#10ac84", "#ee5253", "#ff9f43"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick label: as few decimals as the value needs (`0.25`, `2.5`, `10`).
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// Stacks complete charts vertically into one SVG.
pub fn stack(charts: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}">"##,
        h = H * charts.len() as f64,
    );
    for (i, c) in charts.iter().enumerate() {
        // A nested <svg> takes its position from x/y.
        let inner = c.replacen("<svg ", &format!("<svg y=\"{}\" ", H * i as f64), 1);
        out.push_str(&inner);
    }
    out.push_str("</svg>\n");
    out
}

/// A "nice" upper bound for an axis and its tick step.
fn axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.25);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn frame(out: &mut String, title: &str, unit: &str, top: f64, step: f64) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="#ffffff"/>
<text x="{x}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{t}</text>
<text x="16" y="{ym}" transform="rotate(-90 16 {ym})" text-anchor="middle">{u}</text>
"##,
        x = W / 2.0,
        t = escape(title),
        ym = TOP + (H - TOP - BOTTOM) / 2.0,
        u = escape(unit),
    );
    let plot_h = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let y = TOP + plot_h - v / top * plot_h;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{x2}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{l}</text>"##,
            x2 = W - RIGHT,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            l = tick(v),
        );
        v += step;
    }
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="#333"/><line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="#333"/>"##,
        b = H - BOTTOM,
        r = W - RIGHT,
    );
}

fn legend(out: &mut String, series: &[Series], absent: &[String]) {
    let mut x = LEFT;
    let y = H - 30.0;
    for s in series {
        let _ = writeln!(
            out,
            r##"<rect x="{x}" y="{ry}" width="12" height="12" fill="{c}"/><text x="{tx}" y="{y}">{n}</text>"##,
            ry = y - 10.0,
            c = s.color,
            tx = x + 16.0,
            n = escape(&s.name),
        );
        x += 24.0 + 7.0 * s.name.chars().count() as f64;
    }
    if !absent.is_empty() {
        let _ = writeln!(
            out,
            r##"<text x="{LEFT}" y="{y2}" fill="#777">not available yet: {a}</text>"##,
            y2 = y + 18.0,
            a = escape(&absent.join(", ")),
        );
    }
}

/// Grouped bars: one group per label, one bar per series, whiskers from min to max.
pub fn bars(
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[Series],
    absent: &[String],
) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .map(|st| st.max)
        .fold(0.0, f64::max);
    let (top, step) = axis(max);
    let mut out = String::new();
    frame(&mut out, title, unit, top, step);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = (group_w * 0.8 / series.len().max(1) as f64).min(60.0);
    for (g, label) in groups.iter().enumerate() {
        let gx = LEFT + g as f64 * group_w;
        let start = gx + (group_w - bar_w * series.len() as f64) / 2.0;
        for (i, s) in series.iter().enumerate() {
            let Some(Some(st)) = s.values.get(g) else {
                continue;
            };
            let x = start + i as f64 * bar_w;
            let y = |v: f64| TOP + plot_h - v / top * plot_h;
            let _ = writeln!(
                out,
                r##"<rect x="{x:.1}" y="{y0:.1}" width="{w:.1}" height="{h:.1}" fill="{c}"><title>{n}: {m} (min {lo}, max {hi})</title></rect>"##,
                y0 = y(st.median),
                w = bar_w - 2.0,
                h = (st.median / top * plot_h).max(0.0),
                c = s.color,
                n = escape(&s.name),
                m = fmt(st.median),
                lo = fmt(st.min),
                hi = fmt(st.max),
            );
            let cx = x + (bar_w - 2.0) / 2.0;
            let _ = writeln!(
                out,
                r##"<line x1="{cx:.1}" y1="{a:.1}" x2="{cx:.1}" y2="{b:.1}" stroke="#222"/><text x="{cx:.1}" y="{ty:.1}" text-anchor="middle" font-size="10">{m}</text>"##,
                a = y(st.min),
                b = y(st.max),
                ty = y(st.max) - 4.0,
                m = fmt(st.median),
            );
        }
        let _ = writeln!(
            out,
            r##"<text x="{x:.1}" y="{y}" text-anchor="middle">{l}</text>"##,
            x = gx + group_w / 2.0,
            y = H - BOTTOM + 18.0,
            l = escape(label),
        );
    }
    legend(&mut out, series, absent);
    out.push_str("</svg>\n");
    out
}

/// Lines over numeric x positions (e.g. pod counts), one per series.
pub fn lines(
    title: &str,
    unit: &str,
    x_label: &str,
    xs: &[f64],
    series: &[Series],
    absent: &[String],
) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .map(|st| st.max)
        .fold(0.0, f64::max);
    let (top, step) = axis(max);
    let x_max = xs.iter().copied().fold(1.0, f64::max);
    let mut out = String::new();
    frame(&mut out, title, unit, top, step);
    let plot_w = W - LEFT - RIGHT - 20.0;
    let plot_h = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + 10.0 + x / x_max * plot_w;
    let py = |v: f64| TOP + plot_h - v / top * plot_h;
    for x in xs {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            px(*x),
            H - BOTTOM + 18.0,
            tick(*x)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
        LEFT + plot_w / 2.0,
        H - BOTTOM + 36.0,
        escape(x_label)
    );
    for s in series {
        let points: Vec<(f64, Stat)> = xs
            .iter()
            .zip(&s.values)
            .filter_map(|(x, v)| v.map(|st| (*x, st)))
            .collect();
        if points.len() > 1 {
            let path: Vec<String> = points
                .iter()
                .map(|(x, st)| format!("{:.1},{:.1}", px(*x), py(st.median)))
                .collect();
            let _ = writeln!(
                out,
                r##"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"##,
                path.join(" "),
                s.color
            );
        }
        for (x, st) in &points {
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"><title>{}: {} at {} (min {}, max {})</title></circle>"##,
                px(*x),
                py(st.median),
                s.color,
                escape(&s.name),
                fmt(st.median),
                fmt(*x),
                fmt(st.min),
                fmt(st.max),
            );
        }
    }
    legend(&mut out, series, absent);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(m: f64) -> Option<Stat> {
        Stat::of(&[m * 0.9, m, m * 1.1])
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(10.0), "10");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn stacked_charts_are_offset() {
        let a = bars("a", "u", &["g".into()], &[], &[]);
        let both = stack(&[a.clone(), a]);
        assert!(both.contains("<svg y=\"0\" ") && both.contains(&format!("<svg y=\"{H}\" ")));
        assert_eq!(both.matches("</svg>").count(), 3);
    }

    #[test]
    fn axes_are_round() {
        assert_eq!(axis(9.3), (10.0, 2.0));
        assert_eq!(axis(0.0), (1.0, 0.25));
        let (top, step) = axis(1234.0);
        assert!(top >= 1234.0 && step > 0.0);
    }

    #[test]
    fn charts_are_well_formed_svg_with_every_series() {
        let series = vec![
            Series {
                name: "no mesh <baseline>".into(),
                color: PALETTE[0],
                values: vec![st(9.0), st(20.0)],
            },
            Series {
                name: "ambient L4".into(),
                color: PALETTE[1],
                values: vec![st(3.0), None],
            },
        ];
        let svg = bars(
            "Throughput",
            "Gbit/s",
            &["1 stream".into(), "4 streams".into()],
            &series,
            &["sidecar L4".into()],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<rect x=").count(),
            3 + 2,
            "3 bars + 2 legend boxes"
        );
        assert!(svg.contains("no mesh &lt;baseline&gt;") && svg.contains("sidecar L4"));
        let svg = lines("Memory", "MiB", "pods", &[4.0, 16.0], &series, &[]);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 3);
    }
}
