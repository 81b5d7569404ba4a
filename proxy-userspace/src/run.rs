//! `svcproxy run`: load and attach the datapath, then keep its maps equal to what the manifest
//! directory describes until asked to stop.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    iface,
    kernel_maps::KernelMaps,
    loader::{Datapath, Hook, MapSizes},
    manifest::{self, DirFingerprint},
    planner::{self, NodeInfo, PlanInput, PlanOptions},
    writer::{MapWriter, WriterConfig},
};

/// How often the manifest directory is checked for changes.
const POLL: Duration = Duration::from_millis(200);

pub struct RunOptions {
    pub manifests: PathBuf,
    pub interfaces: Vec<String>,
    pub hook: Hook,
    pub pin_path: PathBuf,
    pub node_name: String,
    pub sizes: MapSizes,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let patterns = opts
        .interfaces
        .iter()
        .map(|g| glob::Pattern::new(g).with_context(|| format!("bad interface glob {g:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut dp = Datapath::load(&opts.pin_path, &opts.sizes)?;
    let ifaces = iface::matching(&patterns).context("listing interfaces")?;
    if ifaces.is_empty() {
        bail!("no interface matches {:?}", opts.interfaces);
    }
    for name in &ifaces {
        if let Err(e) = dp.attach(name, opts.hook) {
            dp.detach_all();
            return Err(e.into());
        }
    }
    let logs = dp
        .take_logger()
        .map(|logger| tokio::spawn(drain_logs(logger)));
    let result = sync_loop(&mut dp, &opts).await;
    dp.detach_all();
    if let Some(task) = logs {
        task.abort();
    }
    result
}

/// Forwards the datapath's (rare) log records to our log as they arrive.
async fn drain_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and the AsyncFd owns the logger, so the fd
    // stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot watch the eBPF log buffer: {}", e.into_parts().1);
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!("eBPF log buffer: {e}");
                return;
            }
        }
    }
}

async fn sync_loop(dp: &mut Datapath, opts: &RunOptions) -> anyhow::Result<()> {
    let config = WriterConfig {
        max_frontends: opts.sizes.frontends,
        maglev_table_size: opts.sizes.maglev_table_size,
    };
    let mut writer =
        MapWriter::adopt(KernelMaps::take(dp)?, config).context("adopting pinned maps")?;
    tracing::info!(frontends = writer.frontend_count(), pin_path = %opts.pin_path.display(),
        "datapath ready");
    let node = NodeInfo {
        name: opts.node_name.clone(),
        zone: None,
    };
    let plan_opts = PlanOptions::default();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(POLL);
    let mut seen: Option<DirFingerprint> = None;
    let mut failed = false;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {}
        }
        let fp = match DirFingerprint::of(&opts.manifests) {
            Ok(fp) => fp,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        // Re-read on change, and keep retrying while a previous write failed (full map).
        if seen.as_ref() == Some(&fp) && !failed {
            continue;
        }
        seen = Some(fp);
        let set = match manifest::load_dir(&opts.manifests) {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        // The errors name their file; a bad file is skipped whole, the rest applies.
        for err in &set.errors {
            tracing::warn!("skipped file: {err}");
        }
        for warning in &set.warnings {
            tracing::warn!("{warning}");
        }
        let desired = planner::plan(&PlanInput {
            services: &set.services,
            slices: &set.slices,
            node: &node,
            options: &plan_opts,
        });
        for r in &desired.rejections {
            tracing::warn!("refused {}: {}", r.object, r.reason);
        }
        let stats = writer.apply(&desired);
        failed = stats.failed > 0;
        if stats.frontends_written + stats.frontends_removed + stats.failed == 0 {
            tracing::debug!(frontends = desired.frontends.len(), "no change");
            continue;
        }
        tracing::info!(
            frontends = desired.frontends.len(),
            written = stats.frontends_written,
            removed = stats.frontends_removed,
            failed = stats.failed,
            "synced"
        );
    }
    tracing::info!("stopping; maps stay pinned for the next start");
    Ok(())
}
