//! `kiln health`: one GET of the server's readiness endpoint; exit 0 on HTTP 200. Container
//! HEALTHCHECKs run it (a FROM-scratch image has no curl).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Most bytes of an error response body quoted in the message.
const BODY_QUOTE: usize = 200;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The URL to GET (plain http). Default: http://127.0.0.1:<port>/v2/health/ready, with the
    /// port of KILN_HTTP_PORT when that is set (the variable `kiln serve` reads), else 8000.
    #[arg(long, env = "KILN_HEALTH_URL")]
    url: Option<String>,
    /// Give up after this many seconds (connect and response together).
    #[arg(long, env = "KILN_HEALTH_TIMEOUT_SECS", default_value_t = 3)]
    timeout_secs: u64,
}

/// The URL checked when `--url` is not given: readiness on the local HTTP port, taken from
/// `KILN_HTTP_PORT` so that a container started with another port checks that one.
fn default_url() -> Result<String> {
    let port = match std::env::var("KILN_HTTP_PORT") {
        Ok(p) => p
            .trim()
            .parse::<u16>()
            .with_context(|| format!("KILN_HTTP_PORT={p:?} is not a port number"))?,
        Err(_) => 8000,
    };
    Ok(format!("http://127.0.0.1:{port}/v2/health/ready"))
}

pub fn health(args: HealthArgs) -> Result<()> {
    let url = match args.url {
        Some(u) => u,
        None => default_url()?,
    };
    let uri: Uri = url.parse().with_context(|| format!("--url {url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("{url}: only http:// URLs are supported, not {other}://"),
        None => bail!("{url}: the URL needs a scheme and host, e.g. http://127.0.0.1:8000/v2/health/ready"),
    }
    if args.timeout_secs == 0 {
        bail!("--timeout-secs must be at least 1");
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (status, body) = runtime
        .block_on(async { tokio::time::timeout(timeout, get(uri)).await })
        .map_err(|_| anyhow!("{url}: no response within {}s", args.timeout_secs))?
        .with_context(|| format!("GET {url}"))?;
    if status != hyper::StatusCode::OK {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.trim().chars().take(BODY_QUOTE).collect();
        if text.is_empty() {
            bail!("{url}: HTTP {status}");
        }
        bail!("{url}: HTTP {status}: {text}");
    }
    outln!("{url}: HTTP {status}");
    Ok(())
}

async fn get(uri: Uri) -> Result<(hyper::StatusCode, Bytes)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client.get(uri).await.map_err(client_error)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the response")?
        .to_bytes();
    Ok((status, body))
}

/// The legacy client's error says only "client error (Connect)"; the cause (e.g. "Connection
/// refused (os error 111)") is further down its source chain: name the innermost one.
fn client_error(e: hyper_util::client::legacy::Error) -> anyhow::Error {
    let what = if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut innermost = None;
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        innermost = Some(c.to_string());
        cause = c.source();
    }
    anyhow!("{what}: {}", innermost.unwrap_or_else(|| e.to_string()))
}
