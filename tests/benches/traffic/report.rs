//! The figures of a run and their presentation: per-repetition values, min/median/max,
//! ratios paired repetition by repetition (repetition i of every variant shares one stretch of
//! time, so the machine's drift cancels in the ratio), the Markdown table, the JSON rows and
//! the target check against PERF.md.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::variant::Variant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    ConnsPerS,
    P50Us,
    P99Us,
    UdpPerS,
    BulkGbit,
    SoftirqPct,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::ConnsPerS,
        Metric::P50Us,
        Metric::P99Us,
        Metric::UdpPerS,
        Metric::BulkGbit,
        Metric::SoftirqPct,
    ];

    /// The JSON name, unit included.
    pub fn key(self) -> &'static str {
        match self {
            Metric::ConnsPerS => "conns_per_s",
            Metric::P50Us => "p50_us",
            Metric::P99Us => "p99_us",
            Metric::UdpPerS => "udp_rr_per_s",
            Metric::BulkGbit => "bulk_gbit_per_s",
            Metric::SoftirqPct => "softirq_pct",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Metric::ConnsPerS => {
                "New TCP connections per second (connect, one 32-byte request/response, close)"
            }
            Metric::P50Us => "Request/response latency on kept-alive connections, p50 (us)",
            Metric::P99Us => "Request/response latency on kept-alive connections, p99 (us)",
            Metric::UdpPerS => "UDP request/response per second (16 in flight, 16 flows)",
            Metric::BulkGbit => "Bulk TCP throughput, iperf3 (Gbit/s)",
            Metric::SoftirqPct => "Softirq CPU at a fixed offered load (% of one CPU)",
        }
    }

    fn decimals(self) -> usize {
        match self {
            Metric::ConnsPerS | Metric::UdpPerS => 0,
            Metric::P50Us | Metric::P99Us | Metric::SoftirqPct => 1,
            Metric::BulkGbit => 2,
        }
    }
}

/// min / median / max.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Self {
            min: v[0],
            median,
            max: v[v.len() - 1],
        })
    }
}

/// Every per-repetition value of a run.
pub struct Results {
    pub ns: Vec<usize>,
    pub variants: Vec<Variant>,
    values: BTreeMap<(usize, usize, Metric), Vec<f64>>,
}

impl Results {
    pub fn new(ns: &[usize], variants: &[Variant]) -> Self {
        Self {
            ns: ns.to_vec(),
            variants: variants.to_vec(),
            values: BTreeMap::new(),
        }
    }

    pub fn push(&mut self, n: usize, variant: Variant, metric: Metric, value: f64) {
        let v = self.index(variant);
        self.values.entry((n, v, metric)).or_default().push(value);
    }

    fn index(&self, variant: Variant) -> usize {
        self.variants
            .iter()
            .position(|&v| v == variant)
            .unwrap_or(usize::MAX)
    }

    pub fn values(&self, n: usize, variant: Variant, metric: Metric) -> &[f64] {
        self.values
            .get(&(n, self.index(variant), metric))
            .map_or(&[], Vec::as_slice)
    }

    pub fn stat(&self, n: usize, variant: Variant, metric: Metric) -> Option<Stat> {
        Stat::of(self.values(n, variant, metric))
    }

    /// `variant / base`, repetition by repetition, summarised.
    pub fn ratio(&self, n: usize, variant: Variant, base: Variant, metric: Metric) -> Option<Stat> {
        let (a, b) = (
            self.values(n, variant, metric),
            self.values(n, base, metric),
        );
        let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        Stat::of(&ratios)
    }

    /// One Markdown table per figure: rows by N and variant, with ratios to the baselines.
    pub fn tables(&self) -> String {
        let bases = [Variant::Iptables, Variant::Nftables, Variant::Direct];
        let mut out = String::new();
        for metric in Metric::ALL {
            let d = metric.decimals();
            let _ = writeln!(out, "### {}\n", metric.title());
            let _ = writeln!(
                out,
                "| N | variant | median | min - max | x iptables | x nftables | x direct |\n\
                 |---:|---|---:|---:|---:|---:|---:|"
            );
            for &n in &self.ns {
                for &v in &self.variants {
                    let Some(s) = self.stat(n, v, metric) else {
                        continue;
                    };
                    let ratios: Vec<String> = bases
                        .iter()
                        .map(|&b| match self.ratio(n, v, b, metric) {
                            Some(r) if b != v => format!("{:.2}", r.median),
                            _ => "-".into(),
                        })
                        .collect();
                    let _ = writeln!(
                        out,
                        "| {n} | {} | {:.d$} | {:.d$} - {:.d$} | {} |",
                        v.name(),
                        s.median,
                        s.min,
                        s.max,
                        ratios.join(" | ")
                    );
                }
            }
            out.push('\n');
        }
        out
    }

    /// PERF.md's traffic targets for each svcproxy variant, with the measured ratio (median of
    /// the paired repetitions, min - max) and whether it is met. Reported, never asserted.
    pub fn targets(&self) -> String {
        let top = self.ns.iter().copied().max().unwrap_or(1);
        let low = self.ns.iter().copied().min().unwrap_or(1);
        let mut out = String::from(
            "| target | variant | measured (median, min - max) | met |\n|---|---|---:|---|\n",
        );
        for v in [
            Variant::SvcproxyTc,
            Variant::SvcproxyXdp,
            Variant::SvcproxySock,
        ] {
            if !self.variants.contains(&v) {
                continue;
            }
            let checks = [
                (
                    format!("conns/s at N={top} >= 2x iptables"),
                    top,
                    Variant::Iptables,
                    Metric::ConnsPerS,
                    2.0,
                ),
                (
                    format!("conns/s at N={top} >= 1.2x nftables"),
                    top,
                    Variant::Nftables,
                    Metric::ConnsPerS,
                    1.2,
                ),
                (
                    format!("conns/s at N={low} <= 5% below direct"),
                    low,
                    Variant::Direct,
                    Metric::ConnsPerS,
                    0.95,
                ),
            ];
            for (what, n, base, metric, need) in checks {
                let cell = match self.ratio(n, v, base, metric) {
                    Some(r) => format!(
                        "{:.2}x ({:.2} - {:.2}) | {}",
                        r.median,
                        r.min,
                        r.max,
                        if r.median >= need { "yes" } else { "**no**" }
                    ),
                    None => "- | -".into(),
                };
                let _ = writeln!(out, "| {what} | {} | {cell} |", v.name());
            }
            for &n in &self.ns {
                let cell = match self.ratio(n, v, Variant::Direct, Metric::BulkGbit) {
                    Some(r) => format!(
                        "{:.2}x ({:.2} - {:.2}) | {}",
                        r.median,
                        r.min,
                        r.max,
                        if r.median >= 0.95 { "yes" } else { "**no**" }
                    ),
                    None => "- | -".into(),
                };
                let _ = writeln!(
                    out,
                    "| bulk TCP at N={n} >= 95% of direct | {} | {cell} |",
                    v.name()
                );
            }
        }
        out
    }

    /// One object per figure and per ratio, as in PERF.md.
    pub fn json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct Row<'a> {
            variant: &'a str,
            n: usize,
            metric: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            vs: Option<&'a str>,
            min: Option<f64>,
            median: Option<f64>,
            max: Option<f64>,
        }
        let round = |x: f64| x.is_finite().then_some((x * 1000.0).round() / 1000.0);
        let mut rows = Vec::new();
        for &n in &self.ns {
            for &v in &self.variants {
                for metric in Metric::ALL {
                    let Some(s) = self.stat(n, v, metric) else {
                        continue;
                    };
                    rows.push(Row {
                        variant: v.name(),
                        n,
                        metric: metric.key().into(),
                        vs: None,
                        min: round(s.min),
                        median: round(s.median),
                        max: round(s.max),
                    });
                    for base in [Variant::Iptables, Variant::Nftables, Variant::Direct] {
                        if base == v {
                            continue;
                        }
                        if let Some(r) = self.ratio(n, v, base, metric) {
                            rows.push(Row {
                                variant: v.name(),
                                n,
                                metric: format!("{}_ratio", metric.key()),
                                vs: Some(base.name()),
                                min: round(r.min),
                                median: round(r.median),
                                max: round(r.max),
                            });
                        }
                    }
                }
            }
        }
        Ok(serde_json::to_string_pretty(&rows)? + "\n")
    }
}
