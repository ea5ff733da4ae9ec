//! `tensorlink-node`: the service each Mac runs (under launchd once installed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tensorlink::cli::Args;
use tensorlink::engine::Backend;
use tensorlink::inference::{models_dir, Inference};
use tensorlink::{fetch, logfiles, node, telemetry};

/// How long in-flight requests get to finish after SIGTERM. launchd waits 20 s
/// (ExitTimeOut) before SIGKILL; stay well inside it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(n) = args.threads {
        // candle's matmuls and rayon both read this; set before any thread starts.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    telemetry::init();
    raise_fd_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(args));
    // A load or a hash still running on a blocking thread (a fetched model's)
    // must not hold the exit past launchd's patience.
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn run(args: Args) -> ExitCode {
    let config = args.node_config();
    // Before anything can fail: a node that exits at start-up (a bad model
    // file) is restarted every 2 s and must not grow its log for ever either.
    if let Some(dir) = &args.log_dir {
        if let Err(e) = logfiles::rotate(dir, args.log_max_bytes) {
            tracing::warn!("cannot rotate the logs in {}: {e}", dir.display());
        }
    }
    let options = args.load_options(&config);
    let (backend, wanted) = match model_path(&args) {
        Err(e) => match fetchable(&args) {
            Some(target) => (Backend::Model(Default::default()), Some(target)),
            None => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Ok(None) => (Backend::NoModel, None),
        Ok(Some(path)) => {
            match Inference::load_in_background(&config.node_id, &path, &options).await {
                Ok(inference) => (Backend::model(inference), None),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let slot = backend.slot();
    let node_id = config.node_id.clone();
    let running = match node::start(config, backend).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let fetching = tokio_util::sync::CancellationToken::new();
    if let Some(target) = wanted {
        let peers = running.node.cluster().peers().clone();
        tokio::spawn(fetch::fetch_and_load(
            node_id,
            target,
            options,
            peers,
            slot,
            fetching.clone(),
        ));
    }
    let logs = tokio_util::sync::CancellationToken::new();
    if let Some(dir) = args.log_dir.clone() {
        tokio::spawn(logfiles::follow(dir, args.log_max_bytes, logs.clone()));
    }
    let signal = wait_for_signal().await;
    logs.cancel();
    // A fetch stops where it is; the next start resumes from its partial file.
    fetching.cancel();
    tracing::info!("{signal} received; shutting down");
    if running.shutdown(SHUTDOWN_GRACE).await {
        tracing::info!("stopped cleanly");
    } else {
        tracing::warn!("in-flight work did not finish within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    ExitCode::SUCCESS
}

/// `--model` resolved, or the one model in the models directory, or none.
fn model_path(args: &Args) -> Result<Option<PathBuf>, models_dir::ModelLookupError> {
    let dir = args.models_dir();
    match &args.model {
        Some(model) => models_dir::resolve(model, dir.as_deref()).map(Some),
        None => {
            let Some(dir) = dir else { return Ok(None) };
            match models_dir::available(&dir).as_slice() {
                [one] => Ok(Some(dir.join(one))),
                [] => {
                    tracing::info!(
                        "no --model and no model in {}: serving without one",
                        dir.display()
                    );
                    Ok(None)
                }
                many => {
                    tracing::warn!(
                        "no --model, and {} holds several ({}): serving without one",
                        dir.display(),
                        many.join(", ")
                    );
                    Ok(None)
                }
            }
        }
    }
}

/// Where a `--model` that is not there can be fetched to.
fn fetchable(args: &Args) -> Option<PathBuf> {
    let target = models_dir::target(args.model.as_deref()?, args.models_dir().as_deref())?;
    // Only where nothing is, not even a link to a drive not mounted now.
    fetch::download::is_absent(&target).then_some(target)
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the node with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Every peer link, tunnel hop and API client is a descriptor; launchd's default
/// soft limit (256) is low for a node under load. Raise the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // macOS refuses a soft limit above OPEN_MAX (10240) even when the hard limit
    // is "unlimited".
    let target = if cfg!(target_vendor = "apple") {
        hard.min(10240)
    } else {
        hard
    };
    if target > soft {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            tracing::warn!("cannot raise the open-file limit from {soft} to {target}: {e}");
        }
    }
}
