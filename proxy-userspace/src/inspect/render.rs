//! Output of the inspection reports: aligned text tables for people, JSON for tools. Both are
//! rendered from the same report, so they cannot disagree.

use serde::Serialize;

use super::{explain::Explanation, flows::FlowsReport, services::ServicesReport};

/// `--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// One JSON document (pretty-printed).
    Json,
}

pub fn json(report: &impl Serialize) -> String {
    // The reports hold only strings, numbers and lists: serialising cannot fail, and if it
    // did, the output would still be JSON.
    let mut text = serde_json::to_string_pretty(report)
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
    text.push('\n');
    text
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(v: Option<&str>) -> String {
    match v {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".into(),
    }
}

fn percent(weight: Option<f64>) -> String {
    weight.map_or_else(|| "?".into(), |w| format!("{:.1}%", w * 100.0))
}

pub fn services_table(r: &ServicesReport) -> String {
    let rows: Vec<Vec<String>> = r
        .services
        .iter()
        .map(|s| {
            vec![
                match (&s.namespace, &s.name) {
                    (Some(ns), Some(n)) => format!("{ns}/{n}"),
                    _ => "?".into(),
                },
                or_dash(s.port_name.as_deref()),
                s.frontend.clone(),
                s.service_id.to_string(),
                or_dash(s.address_kind),
                s.algorithm.to_owned(),
                s.affinity_timeout_s
                    .map_or_else(|| "-".into(), |t| format!("ClientIP {t}s")),
                s.without_backends.to_owned(),
                s.counters.packets.to_string(),
                s.counters.bytes.to_string(),
                s.counters.new_flows.to_string(),
                if s.reasons.is_empty() {
                    "-".into()
                } else {
                    s.reasons.join(",")
                },
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SERVICE",
            "PORT",
            "FRONTEND",
            "ID",
            "TYPE",
            "SELECTION",
            "AFFINITY",
            "NO BACKEND",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "WHY",
        ],
        &rows,
    );
    let backends: Vec<Vec<String>> = r
        .services
        .iter()
        .flat_map(|s| {
            s.backends.iter().map(|b| {
                vec![
                    s.frontend.clone(),
                    format!("{}:{}", b.address, b.port),
                    b.id.to_string(),
                    b.state.clone(),
                    percent(b.weight),
                ]
            })
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["FRONTEND", "BACKEND", "ID", "STATE", "WEIGHT"],
        &backends,
    ));
    let outcomes: Vec<Vec<String>> = r
        .outcomes
        .iter()
        .filter(|(_, n)| **n != 0)
        .map(|(name, n)| vec![(*name).to_owned(), n.to_string()])
        .collect();
    out.push('\n');
    out.push_str(&table(&["OUTCOME", "PACKETS"], &outcomes));
    out
}

pub fn flows_table(r: &FlowsReport) -> String {
    let rows: Vec<Vec<String>> = r
        .flows
        .iter()
        .map(|f| {
            vec![
                f.protocol.clone(),
                f.client.to_string(),
                f.frontend.to_string(),
                f.backend.to_string(),
                or_dash(f.service.as_deref()),
                or_dash(f.port_name.as_deref()),
                f.state.to_owned(),
                format!("{:.0}s", f.idle_s),
                match (f.live, f.backend_current) {
                    (false, _) => "expired".into(),
                    (true, false) => "backend gone".into(),
                    (true, true) => "live".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SERVICE", "PORT", "STATE", "IDLE", "STATUS",
        ],
        &rows,
    )
}

pub fn explain_text(e: &Explanation) -> String {
    let mut out = format!("{} -> {}\n", e.source, e.destination);
    let target = match &e.backend {
        Some(b) => format!(" to {}:{} (backend {})", b.address, b.port, b.id),
        None => String::new(),
    };
    let index = e
        .maglev_index
        .map_or_else(String::new, |i| format!(", Maglev entry {i}"));
    out.push_str(&format!(
        "verdict: {}{target}, decided by {}{index}\n",
        e.verdict, e.decided_by
    ));
    for (i, step) in e.steps.iter().enumerate() {
        out.push_str(&format!("  {}. {step}\n", i + 1));
    }
    if !e.candidates.is_empty() {
        let rows: Vec<Vec<String>> = e
            .candidates
            .iter()
            .map(|c| {
                vec![
                    format!("{}:{}", c.address, c.port),
                    c.id.to_string(),
                    percent(c.weight),
                ]
            })
            .collect();
        out.push_str("candidates:\n");
        for line in table(&["BACKEND", "ID", "SHARE"], &rows).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}
