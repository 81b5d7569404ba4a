//! Hand-written SVG line charts: one line per variant over the Service counts (equally spaced
//! categories), the median as the point and min - max as a whisker. Small enough that a
//! plotting crate would be more code to learn than this is to read.

use std::fmt::Write as _;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
/// Colour-blind-friendly (Okabe-Ito), one per line in order.
const COLOURS: [&str; 8] = [
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#0072B2", "#F0E442",
];

pub struct Series {
    pub name: String,
    pub dashed: bool,
    /// (min, median, max) per x category; None where nothing was measured.
    pub points: Vec<Option<(f64, f64, f64)>>,
}

/// A chart of `series` over the categories `x_labels`, y from 0.
pub fn line_chart(
    title: &str,
    x_title: &str,
    y_title: &str,
    x_labels: &[String],
    series: &[Series],
) -> String {
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().flatten().map(|p| p.2))
        .fold(0.0f64, f64::max);
    let y_top = nice_ceiling(y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_at = |i: usize| {
        let slots = x_labels.len().max(1) as f64;
        LEFT + plot_w * (i as f64 + 0.5) / slots
    };
    let y_at = |v: f64| TOP + plot_h * (1.0 - v / y_top);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    // Horizontal grid with y labels.
    for k in 0..=5 {
        let v = y_top * k as f64 / 5.0;
        let y = y_at(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            fmt_value(v)
        );
    }
    for (i, label) in x_labels.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x_at(i),
            TOP + plot_h + 18.0,
            escape(label)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 16.0,
        escape(x_title)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        escape(y_title)
    );
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let series_total = series.len() as f64;
    for (k, series) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let dash = if series.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        // A small sideways offset per series keeps whiskers of equal values apart.
        let nudge = (k as f64 - (series_total - 1.0) / 2.0) * 3.0;
        let mut path = Vec::new();
        for (i, p) in series.points.iter().enumerate() {
            let Some((min, med, max)) = *p else { continue };
            let x = x_at(i) + nudge;
            path.push(format!("{x:.1},{:.1}", y_at(med)));
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{colour}"/><circle cx="{x:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                y_at(min),
                y_at(max),
                y_at(med)
            );
        }
        if path.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
        }
        let ly = TOP + 10.0 + 18.0 * k as f64;
        let lx = LEFT + plot_w + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            escape(&series.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `v` (and at least 1).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_value(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
