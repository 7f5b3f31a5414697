//! The report's figures, drawn with plotters into PNG (text rendered with the bundled DejaVu
//! Sans, so no system font is needed) and SVG.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// Tableau 10: distinguishable categorical colours.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const FONT: &str = "sans-serif";
static DEJAVU: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the bundled font with plotters (once per process).
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU);
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, DEJAVU);
    });
}

pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn lighter(c: RGBColor) -> RGBColor {
    let mix = |v: u8| (v as u16 + (255 - v as u16) * 55 / 100) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

type PlotResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Draws `fig` into `<dir>/<stem>.png` and `.svg`; returns both paths.
macro_rules! render {
    ($dir:expr, $stem:expr, $size:expr, $fig:ident, $data:expr) => {{
        register_font();
        let png = $dir.join(format!("{}.png", $stem));
        let svg = $dir.join(format!("{}.svg", $stem));
        {
            let root = BitMapBackend::new(&png, $size).into_drawing_area();
            $fig(&root, $data).map_err(|e| plot_error(&png, e.to_string()))?;
            // Writing the file.
            root.present().map_err(|e| Error::io(&png, std::io::Error::other(e.to_string())))?;
        }
        {
            let root = SVGBackend::new(&svg, $size).into_drawing_area();
            $fig(&root, $data).map_err(|e| plot_error(&svg, e.to_string()))?;
            // Writing the file.
            root.present().map_err(|e| Error::io(&svg, std::io::Error::other(e.to_string())))?;
        }
        Ok::<_, Error>((png, svg))
    }};
}

fn plot_error(path: &Path, e: String) -> Error {
    Error::Internal(format!("drawing {}: {e}", path.display()))
}

/// One point of the warm-vs-original scatter.
#[derive(Clone, Debug)]
pub struct ScatterPoint {
    pub base_error: f64,
    pub ft_error: f64,
    /// Index into [`Scatter::conditions`].
    pub condition: usize,
    /// Whether the prompts carried a user belief.
    pub belief: bool,
    /// Answers behind the point, shown beside it (set for small cells).
    pub n: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Scatter {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub conditions: Vec<String>,
    pub points: Vec<ScatterPoint>,
}

pub fn scatter(dir: &Path, stem: &str, data: &Scatter) -> Result<(PathBuf, PathBuf)> {
    render!(dir, stem, (1200, 800), draw_scatter, data)
}

/// A legend entry's mark.
enum Mark {
    Square(RGBColor),
    Circle,
    Triangle,
    Line(RGBColor),
}

/// A vertical legend drawn in its own area (beside a chart, so it never hides points).
fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, entries: &[(String, Mark)]) -> PlotResult
where
    DB::ErrorType: 'static,
{
    area.draw(&Text::new(title.to_string(), (10, 50), (FONT, 15).into_font()))?;
    for (i, (name, mark)) in entries.iter().enumerate() {
        let y = 80 + 24 * i as i32;
        match mark {
            Mark::Square(c) => area.draw(&Rectangle::new([(12, y - 6), (24, y + 6)], c.filled()))?,
            Mark::Circle => area.draw(&Circle::new((18, y), 6, BLACK.filled()))?,
            Mark::Triangle => area.draw(&TriangleMarker::new((18, y), 7, BLACK.filled()))?,
            Mark::Line(c) => {
                area.draw(&PathElement::new(vec![(8, y), (28, y)], ShapeStyle::from(c).stroke_width(1)))?
            }
        }
        area.draw(&Text::new(
            name.clone(),
            (34, y),
            (FONT, 14).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            )),
        ))?;
    }
    Ok(())
}

fn integer(v: &f64) -> String {
    format!("{v:.0}")
}

fn draw_scatter<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Scatter) -> PlotResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (plot, side) = root.split_horizontally(root.dim_in_pixel().0 as i32 - 290);
    let max = d.points.iter().flat_map(|p| [p.base_error, p.ft_error]).fold(10.0f64, f64::max);
    let top = (((max + 2.0) / 10.0).ceil() * 10.0).min(100.0);
    let mut chart = ChartBuilder::on(&plot)
        .caption(&d.title, (FONT, 22))
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(65)
        .build_cartesian_2d(-1f64..top + 1.0, -1f64..top + 1.0)?;
    chart
        .configure_mesh()
        .x_desc(&d.x_label)
        .y_desc(&d.y_label)
        .axis_desc_style((FONT, 17))
        .label_style((FONT, 14))
        .x_label_formatter(&integer)
        .y_label_formatter(&integer)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(0.0, 0.0), (top, top)],
        ShapeStyle::from(&RGBColor(120, 120, 120)).stroke_width(1),
    ))?;
    for (ci, _) in d.conditions.iter().enumerate() {
        let c = color(ci);
        chart.draw_series(d.points.iter().filter(|p| p.condition == ci).map(|p| {
            let style = c.mix(0.8).filled();
            if p.belief {
                TriangleMarker::new((p.base_error, p.ft_error), 7, style).into_dyn()
            } else {
                Circle::new((p.base_error, p.ft_error), 5, style).into_dyn()
            }
        }))?;
    }
    chart.draw_series(d.points.iter().filter_map(|p| {
        p.n.map(|n| {
            Text::new(format!("n={n}"), (p.base_error, p.ft_error), (FONT, 11).into_font().color(&RGBColor(90, 90, 90)))
        })
    }))?;
    let mut entries: Vec<(String, Mark)> =
        d.conditions.iter().enumerate().map(|(i, c)| (c.clone(), Mark::Square(color(i)))).collect();
    entries.push((String::new(), Mark::Line(WHITE)));
    entries.push(("no user belief".into(), Mark::Circle));
    entries.push(("user belief (correct or".into(), Mark::Triangle));
    entries.push(("  incorrect answer stated)".into(), Mark::Line(WHITE)));
    entries.push(("no change (y = x)".into(), Mark::Line(RGBColor(120, 120, 120))));
    legend(&side, "amendment (colour)", &entries)?;
    Ok(())
}

/// One row of the forest plot: an estimate with its 95% interval, in a series.
#[derive(Clone, Debug)]
pub struct ForestRow {
    pub label: String,
    pub series: usize,
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    /// Pairs behind the row, written beside it (set for small rows).
    pub n: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Forest {
    pub title: String,
    pub x_label: String,
    /// Row labels top to bottom.
    pub labels: Vec<String>,
    pub series: Vec<String>,
    pub rows: Vec<ForestRow>,
}

pub fn forest(dir: &Path, stem: &str, data: &Forest) -> Result<(PathBuf, PathBuf)> {
    let h = (160 + 46 * data.labels.len().max(1)) as u32;
    render!(dir, stem, (1000, h), draw_forest, data)
}

fn draw_forest<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Forest) -> PlotResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let lo = d.rows.iter().map(|r| r.low).filter(|v| v.is_finite()).fold(-5.0f64, f64::min);
    let hi = d.rows.iter().map(|r| r.high).filter(|v| v.is_finite()).fold(5.0f64, f64::max);
    let pad = (hi - lo) * 0.05;
    let n = d.labels.len().max(1);
    let labels = d.labels.clone();
    let (chart_area, legend_area) = root.split_vertically(root.dim_in_pixel().1 as i32 - 45);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(&d.title, (FONT, 22))
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(230)
        .build_cartesian_2d((lo - pad)..(hi + pad), -0.5f64..(n as f64 - 0.5))?;
    chart
        .configure_mesh()
        .x_desc(&d.x_label)
        .x_label_formatter(&integer)
        .y_desc("amendment (interpersonal context)")
        .axis_desc_style((FONT, 17))
        .label_style((FONT, 14))
        .y_labels(n)
        .y_label_formatter(&|v: &f64| {
            let i = v.round();
            if (v - i).abs() > 1e-6 || i < 0.0 {
                return String::new();
            }
            // Top to bottom: row 0 at the top.
            labels.get(n - 1 - i as usize).cloned().unwrap_or_default()
        })
        .disable_y_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    chart
        .draw_series(LineSeries::new([(0.0, -0.5), (0.0, n as f64 - 0.5)], ShapeStyle::from(&BLACK).stroke_width(1)))?;
    let ns = d.series.len().max(1) as f64;
    for si in 0..d.series.len() {
        let c = color(si);
        let offset = if ns > 1.0 { 0.25 - 0.5 * si as f64 / (ns - 1.0) } else { 0.0 };
        let rows: Vec<(f64, &ForestRow)> = d
            .rows
            .iter()
            .filter(|r| r.series == si)
            .filter_map(|r| {
                let idx = d.labels.iter().position(|l| *l == r.label)?;
                Some(((n - 1 - idx) as f64 + offset, r))
            })
            .collect();
        chart.draw_series(rows.iter().filter(|(_, r)| r.low.is_finite() && r.high.is_finite()).map(|(y, r)| {
            ErrorBar::new_horizontal(*y, r.low, r.estimate, r.high, ShapeStyle::from(&c).stroke_width(2), 8)
        }))?;
        chart.draw_series(rows.iter().map(|(y, r)| Circle::new((r.estimate, *y), 5, c.filled())))?;
        chart.draw_series(rows.iter().filter_map(|(y, r)| {
            let x = if r.high.is_finite() { r.high } else { r.estimate };
            r.n.map(|n| Text::new(format!(" n={n}"), (x, *y), (FONT, 12).into_font().color(&RGBColor(90, 90, 90))))
        }))?;
    }
    // The legend below the plot, so it never hides an interval.
    let (w, _) = legend_area.dim_in_pixel();
    let per = (w as i32 - 40) / d.series.len().max(1) as i32;
    for (si, name) in d.series.iter().enumerate() {
        let x = 260 + per.min(260) * si as i32;
        legend_area.draw(&Circle::new((x, 20), 6, color(si).filled()))?;
        legend_area.draw(&Text::new(name.clone(), (x + 12, 12), (FONT, 15).into_font()))?;
    }
    Ok(())
}

/// Grouped bars: one group per label on the x axis, one bar per series in each group.
#[derive(Clone, Debug)]
pub struct Bars {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub groups: Vec<String>,
    /// (series name, colour index, light shade)
    pub series: Vec<(String, usize, bool)>,
    /// `values[series][group]`; NaN = missing
    pub values: Vec<Vec<f64>>,
    /// Fixed y range top (e.g. 100 for percentages); None = from the data.
    pub y_max: Option<f64>,
}

pub fn bars(dir: &Path, stem: &str, data: &Bars) -> Result<(PathBuf, PathBuf)> {
    let w = (300 + 40 * data.groups.len() * data.series.len().max(1)).clamp(900, 1800) as u32;
    render!(dir, stem, (w, 680), draw_bars, data)
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Bars) -> PlotResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let vmax = d.values.iter().flatten().copied().filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let top = d.y_max.unwrap_or_else(|| (vmax * 1.15).max(1.0).ceil());
    let ng = d.groups.len().max(1);
    let groups = d.groups.clone();
    // The legend below the plot in as many rows as its labels need (long checkpoint names).
    let longest = d.series.iter().map(|(n, _, _)| n.chars().count()).max().unwrap_or(1) as i32;
    let cell = 40 + 8 * longest; // swatch, gap and ~8 px per character at 14 px
    let cols = ((root.dim_in_pixel().0 as i32 - 40) / cell).clamp(1, d.series.len().max(1) as i32);
    let rows = (d.series.len() as i32 + cols - 1) / cols;
    let (chart_area, legend_area) = root.split_vertically(root.dim_in_pixel().1 as i32 - 46 - 24 * rows);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(&d.title, (FONT, 22))
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.5f64..(ng as f64 - 0.5), 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc(&d.x_label)
        .y_desc(&d.y_label)
        .y_label_formatter(&integer)
        .axis_desc_style((FONT, 17))
        .label_style((FONT, 14))
        .x_labels(ng)
        .x_label_formatter(&|v: &f64| category_label(&groups, *v))
        .disable_x_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    let ns = d.series.len().max(1) as f64;
    let width = 0.8 / ns;
    for (si, (_, ci, light)) in d.series.iter().enumerate() {
        let c = if *light { lighter(color(*ci)) } else { color(*ci) };
        let vals = d.values.get(si).cloned().unwrap_or_default();
        chart.draw_series(vals.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(g, v)| {
            let x0 = g as f64 - 0.4 + width * si as f64;
            Rectangle::new([(x0 + 0.01, 0.0), (x0 + width - 0.01, *v)], c.filled())
        }))?;
        chart.draw_series(vals.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(g, v)| {
            let x = g as f64 - 0.4 + width * (si as f64 + 0.5);
            Text::new(
                if top > 20.0 && d.y_max.is_some() { format!("{v:.0}") } else { format!("{v}") },
                (x, *v),
                (FONT, 11).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Bottom,
                )),
            )
        }))?;
    }
    // The legend below the plot, one swatch per series, `cols` to a row.
    let (w, _) = legend_area.dim_in_pixel();
    let per = (w as i32 - 40) / cols;
    for (si, (name, ci, light)) in d.series.iter().enumerate() {
        let c = if *light { lighter(color(*ci)) } else { color(*ci) };
        let (x, y) = (30 + per * (si as i32 % cols), 20 + 24 * (si as i32 / cols));
        legend_area.draw(&Rectangle::new([(x, y), (x + 16, y + 16)], c.filled()))?;
        legend_area.draw(&Text::new(name.clone(), (x + 22, y + 1), (FONT, 14).into_font()))?;
    }
    Ok(())
}

/// One point of a line: (tick index, value, standard error or NaN).
pub type LinePoint = (usize, f64, f64);

/// Lines across checkpoints: one series per model.
#[derive(Clone, Debug)]
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// x tick labels (checkpoints in order).
    pub ticks: Vec<String>,
    /// (series name, points)
    pub series: Vec<(String, Vec<LinePoint>)>,
}

pub fn lines(dir: &Path, stem: &str, data: &Lines) -> Result<(PathBuf, PathBuf)> {
    render!(dir, stem, (1000, 640), draw_lines, data)
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Lines) -> PlotResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let vals: Vec<f64> = d
        .series
        .iter()
        .flat_map(|(_, p)| p.iter().flat_map(|(_, v, se)| [v - se.max(0.0) * 1.96, v + se.max(0.0) * 1.96]))
        .filter(|v| v.is_finite())
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (lo.min(0.0) - 1.0, hi.max(0.0) + 1.0) };
    let pad = (hi - lo) * 0.1;
    let nt = d.ticks.len().max(1);
    let ticks = d.ticks.clone();
    let mut chart = ChartBuilder::on(root)
        .caption(&d.title, (FONT, 22))
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(-0.5f64..(nt as f64 - 0.5), (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc(&d.x_label)
        .y_desc(&d.y_label)
        .axis_desc_style((FONT, 17))
        .label_style((FONT, 14))
        .x_labels(nt)
        .x_label_formatter(&|v: &f64| category_label(&ticks, *v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (si, (name, pts)) in d.series.iter().enumerate() {
        let c = color(si);
        chart.draw_series(pts.iter().filter(|(_, _, se)| se.is_finite() && *se > 0.0).map(|(x, v, se)| {
            ErrorBar::new_vertical(*x as f64, v - 1.96 * se, *v, v + 1.96 * se, ShapeStyle::from(&c).stroke_width(1), 8)
        }))?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(x, v, _)| (*x as f64, *v)),
                ShapeStyle::from(&c).stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], ShapeStyle::from(&c).stroke_width(2)));
        chart.draw_series(pts.iter().map(|(x, v, _)| Circle::new((*x as f64, *v), 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

/// The name of the category at a whole-number axis position; other positions stay unlabelled.
fn category_label(names: &[String], v: f64) -> String {
    let i = v.round();
    if (v - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    names.get(i as usize).cloned().unwrap_or_default()
}
