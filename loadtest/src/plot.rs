//! Line charts for the benchmark reports: one value against the project count, one
//! line per target, written side by side as SVG and PNG (plotters).
//!
//! Both axes are logarithmic: the scale points span 100 to 30,000 projects and the
//! values (watchers, MiB, ms) span several decades between targets.
//!
//! Text needs a TrueType font. Debian's `fonts-dejavu-core` (installed by
//! `make deps`) is loaded once, at the first chart.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::Error;

/// One line of a chart: points with x > 0 and y > 0 (log axes).
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

/// What a chart shows.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series>,
}

const FONT_PATHS: &[&str] = &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

fn register_font() -> Result<(), Error> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = FONT_PATHS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| format!("no font at {FONT_PATHS:?} (apt-get install fonts-dejavu-core)"))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "invalid font file".to_string())
    })
    .clone()
    .map_err(Error::from)
}

/// Writes `<stem>.svg` and `<stem>.png`; returns both paths.
pub fn write(stem: &Path, chart: &Chart) -> Result<Vec<PathBuf>, Error> {
    register_font()?;
    let (svg, png) = (stem.with_extension("svg"), stem.with_extension("png"));
    draw(SVGBackend::new(&svg, (900, 560)).into_drawing_area(), chart)?;
    draw(BitMapBackend::new(&png, (900, 560)).into_drawing_area(), chart)?;
    Ok(vec![svg, png])
}

/// The smallest and largest value of one coordinate, widened to whole decades so
/// the log axis always has labelled powers of ten.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| *v > 0.0).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (1.0, 10.0);
    }
    let lo = 10f64.powf((lo / 1.2).log10().floor());
    let hi = 10f64.powf((hi * 1.2).log10().ceil());
    (lo, hi.max(lo * 10.0))
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = points().map(|p| p.0).fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (x0, x1) = if x0 > x1 { (1.0, 10.0) } else { (x0 / 1.4, x1 * 1.4) };
    let (y0, y1) = bounds(points().map(|p| p.1));
    let mut ctx = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| e.to_string())?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .draw()
        .map_err(|e| e.to_string())?;
    for s in &chart.series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
        let style = s.color.stroke_width(2);
        let anno = if s.dashed {
            ctx.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style)).map_err(|e| e.to_string())?
        } else {
            ctx.draw_series(LineSeries::new(pts.clone(), style)).map_err(|e| e.to_string())?
        };
        let (style, gap) = (s.color.stroke_width(2), if s.dashed { 5 } else { 0 });
        // A dashed series gets a dashed legend sample: two strokes with a gap.
        anno.label(s.label.as_str()).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (8, 0)], style)
                + PathElement::new(vec![(8 + gap, 0), (21, 0)], style)
        });
        ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 4, s.color.filled()))).map_err(|e| e.to_string())?;
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svg_and_png_with_log_axes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chart = Chart {
            title: "test",
            x_label: "projects",
            y_label: "MiB",
            series: vec![
                Series {
                    label: "a".into(),
                    color: RGBColor(200, 0, 0),
                    dashed: false,
                    points: vec![(100.0, 50.0), (30000.0, 3000.0)],
                },
                // A zero cannot sit on a log axis: it is left out, not a panic.
                Series {
                    label: "b".into(),
                    color: RGBColor(0, 0, 200),
                    dashed: true,
                    points: vec![(100.0, 0.0), (1000.0, 7.0)],
                },
            ],
        };
        let paths = write(&dir.path().join("chart"), &chart).expect("chart written (needs fonts-dejavu-core)");
        assert_eq!(paths.len(), 2);
        let svg = std::fs::read_to_string(&paths[0]).expect("svg");
        assert!(svg.contains("<svg") && svg.contains("projects"));
        let png = std::fs::read(&paths[1]).expect("png");
        assert_eq!(&png[1..4], b"PNG");
    }
}
