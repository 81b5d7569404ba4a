//! What a full run leaves under `bench/results/`: the Markdown report (machine, methods,
//! targets, tables) and the SVG plots.

use std::time::Duration;

use super::{
    Config, cpu,
    measure::{FIXED_RATE, LATENCY_CONNECTIONS},
    report::{Metric, Results},
    svg,
    variant::Variant,
};

pub fn plot(results: &Results, metrics: &[Metric], title: &str, y_title: &str) -> String {
    let labels: Vec<String> = results.ns.iter().map(|n| n.to_string()).collect();
    let mut series = Vec::new();
    for (k, &metric) in metrics.iter().enumerate() {
        for &v in &results.variants {
            let points = results
                .ns
                .iter()
                .map(|&n| results.stat(n, v, metric).map(|s| (s.min, s.median, s.max)))
                .collect();
            let name = if metrics.len() > 1 {
                format!("{} {}", v.name(), metric.key().trim_end_matches("_us"))
            } else {
                v.name().to_owned()
            };
            series.push(svg::Series {
                name,
                dashed: k > 0,
                points,
            });
        }
    }
    svg::line_chart(
        title,
        "Services loaded (N, 10 endpoints each)",
        y_title,
        &labels,
        &series,
    )
}

pub fn markdown(
    cfg: &Config,
    tables: &str,
    targets: &str,
    load_times: &[(usize, Variant, Duration)],
    took: Duration,
) -> String {
    let host = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|| "unknown".into())
    };
    let crate::shared::Machine { kernel, cpu, cpus } = crate::shared::Machine::this();
    let loads: Vec<String> = load_times
        .iter()
        .filter(|(_, v, _)| *v != Variant::Direct)
        .map(|(n, v, t)| format!("{} N={n}: {:.1}s", v.name(), t.as_secs_f64()))
        .collect();
    format!(
        "# Traffic through a ClusterIP, side by side\n\n\
         Produced by `cargo xtask bench traffic` in {:.0} s.\n\n\
         - date: {}\n- kernel: {kernel}\n- CPU: {cpu} ({cpus} CPUs)\n\
         - rule loaders: {}; {}; iperf3: {}\n\
         - {} repetitions of each figure per variant and N; medians with min - max; ratios are \
         medians of the per-repetition ratios. Within a repetition each figure is taken in {} \
         slices that go round the variants, so paired figures share the same second or two of \
         machine time\n\n\
         Topology and methods: see the header of `tests/benches/traffic/main.rs`. Every variant has \
         its own client pod -> node -> 10 backend pods over veths, loaded with N Services x 10 \
         endpoints; the measured Service (in the middle of kube-proxy's Service list) has the 10 \
         real backends, the others unroutable endpoints; iperf3 goes through one more Service \
         with one endpoint. `direct` sends to the pod IPs. Load generator: one thread pinned to \
         CPU {} in the client pod; servers: one thread pinned to CPU {}. Per variant and \
         repetition: connections {:?} with 16 in flight; latency {:?} over {LATENCY_CONNECTIONS} kept-alive connections, one \
         request at a time; UDP {:?}; iperf3 {} s; softirq over {:?} at a fixed {FIXED_RATE} new \
         connections/s (machine-wide /proc/stat, tick-sampled).\n\n\
         Only the iptables and nftables variants have netfilter rules, so only their node runs \
         conntrack; svcproxy and `direct` forward without it. XDP on a veth copies every packet \
         (PERF.md): its bulk figure shows that cost. `svcproxy-sock` is svcproxy with \
         socket-level balancing (`--socket-lb tcp`, hooks on a cgroup the client's load runs \
         in): its TCP sockets are connected to a backend at `connect()` and no TCP packet is \
         translated; its UDP figures take the tc path.\n\n\
         Load times (rules written or maps programmed, until the measured Service answered): \
         {}.\n\n\
         ![connections per second](traffic-conns.svg)\n\n\
         ![latency](traffic-latency.svg)\n\n\
         ## Targets (PERF.md; reported, not asserted)\n\n{targets}\n## Figures\n\n{tables}",
        took.as_secs_f64(),
        host("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        host("iptables-restore", &["--version"]),
        host("nft", &["--version"]),
        host("iperf3", &["--version"]),
        cfg.reps,
        cfg.durations.slices,
        cpu::CLIENT,
        cpu::server(),
        cfg.durations.conns,
        cfg.durations.latency,
        cfg.durations.udp,
        cfg.durations.iperf_secs,
        cfg.durations.softirq,
        loads.join(", "),
    )
}
