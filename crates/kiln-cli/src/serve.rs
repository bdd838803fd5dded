//! `kiln serve`: the model server (KServe v2 HTTP/gRPC, TF-Serving REST, Prometheus metrics).

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kiln_serve::{ControlToken, Server, ServerConfig, TlsConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every flag can also come from its `KILN_*` environment variable.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model repository: <dir>/<model>/config.toml and <dir>/<model>/<version>/model.onnx.
    #[arg(long, env = "KILN_MODEL_REPOSITORY")]
    model_repository: PathBuf,
    /// Address to bind the ports on.
    #[arg(long, env = "KILN_HOST", default_value = "0.0.0.0")]
    host: IpAddr,
    /// KServe v2 HTTP, TF-Serving REST and /metrics.
    #[arg(long, env = "KILN_HTTP_PORT", default_value_t = 8000)]
    http_port: u16,
    /// KServe v2 gRPC.
    #[arg(long, env = "KILN_GRPC_PORT", default_value_t = 8001)]
    grpc_port: u16,
    /// Prometheus /metrics only.
    #[arg(long, env = "KILN_METRICS_PORT", default_value_t = 8002)]
    metrics_port: u16,
    /// Log lines as text or as JSON objects (level filter: RUST_LOG, default info).
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Largest request body (HTTP) or message (gRPC) accepted.
    #[arg(long, env = "KILN_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    max_body_bytes: usize,
    /// Seconds between repository checks for new, changed or removed versions (0: never).
    #[arg(long, env = "KILN_POLL_INTERVAL_SECS", default_value_t = 5)]
    poll_interval_secs: u64,
    /// Require `Authorization: Bearer <token>` on repository load/unload (HTTP and gRPC). Prefer
    /// the environment variable: a flag shows up in the process list.
    #[arg(long, env = "KILN_CONTROL_TOKEN", hide_env_values = true)]
    control_token: Option<String>,
    /// Serve HTTP and gRPC over TLS with this certificate chain (PEM); needs --tls-key. The
    /// metrics port stays plain HTTP.
    #[arg(long, env = "KILN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "KILN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("waiting for ctrl-c")?;
    Ok(())
}

pub fn serve(args: ServeArgs) -> Result<()> {
    init_logging(args.log_format);
    let at = |port: u16| SocketAddr::new(args.host, port);
    let config = ServerConfig {
        model_repository: args.model_repository.clone(),
        http_addr: at(args.http_port),
        grpc_addr: Some(at(args.grpc_port)),
        metrics_addr: Some(at(args.metrics_port)),
        max_body_bytes: args.max_body_bytes,
        poll_interval: (args.poll_interval_secs > 0).then(|| Duration::from_secs(args.poll_interval_secs)),
        control_token: match args.control_token.as_deref() {
            Some(t) => Some(ControlToken::new(t).context("--control-token must not be empty")?),
            None => None,
        },
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-serve-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::start(config)
            .await
            .with_context(|| format!("starting the server on {}", args.model_repository.display()))?;
        // One line on stdout with the bound addresses, for scripts (ports may be 0 = any).
        outln!(
            "kiln serve: http {} grpc {} metrics {}",
            server.http_addr,
            server.grpc_addr.map_or("-".to_string(), |a| a.to_string()),
            server.metrics_addr.map_or("-".to_string(), |a| a.to_string()),
        );
        shutdown_signal().await?;
        server.shutdown().await.context("shutting down")?;
        Ok(())
    })
}
