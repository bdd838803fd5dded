//! Binds the HTTP, gRPC and metrics ports, runs the repository poller, and shuts down
//! gracefully (stop accepting, finish in-flight requests, then unload).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::auth::ControlToken;
use crate::error::{Result, ServeError};
use crate::manager::ModelManager;
use crate::metrics::Metrics;
use crate::protocols::http::HttpState;
use crate::protocols::kserve_v2_grpc::{GrpcInferenceServiceServer, KServeGrpc};
use crate::protocols::tf_grpc::{ModelServiceServer, PredictionServiceServer, TfServingGrpc};
use crate::protocols::{http_router, metrics_router};
use crate::tls::{TlsConfig, TlsListener};

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model_repository: PathBuf,
    /// KServe v2 HTTP, TF-Serving REST and `/metrics` (port 0: any free port).
    pub http_addr: SocketAddr,
    /// KServe v2 gRPC; `None` turns it off.
    pub grpc_addr: Option<SocketAddr>,
    /// A second port with only `/metrics`; `None` turns it off.
    pub metrics_addr: Option<SocketAddr>,
    /// Largest request body (HTTP) or message (gRPC) accepted.
    pub max_body_bytes: usize,
    /// How often the repository is checked for new, changed or removed versions.
    pub poll_interval: Option<Duration>,
    /// When set, repository load/unload (HTTP and gRPC) need `Authorization: Bearer <token>`.
    pub control_token: Option<ControlToken>,
    /// When set, the HTTP and gRPC ports speak TLS only (the metrics port stays plain HTTP).
    pub tls: Option<TlsConfig>,
}

impl ServerConfig {
    /// Triton's default ports (8000, 8001, 8002) on all interfaces, 64 MiB bodies, polling
    /// every 5 s.
    pub fn new(model_repository: impl Into<PathBuf>) -> Self {
        ServerConfig {
            model_repository: model_repository.into(),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8000)),
            grpc_addr: Some(SocketAddr::from(([0, 0, 0, 0], 8001))),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 8002))),
            max_body_bytes: 64 << 20,
            poll_interval: Some(Duration::from_secs(5)),
            control_token: None,
            tls: None,
        }
    }
}

/// A running server. Drop it or call [`Server::shutdown`] to stop.
pub struct Server {
    pub http_addr: SocketAddr,
    pub grpc_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    manager: Arc<ModelManager>,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<std::result::Result<(), String>>)>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // Either the flag flips or the sender is gone: both mean stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

impl Server {
    /// Loads the repository, then binds every port and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server> {
        let metrics = Arc::new(Metrics::new()?);
        let manager = Arc::new(ModelManager::new(&config.model_repository, metrics)?);
        let loader = manager.clone();
        let failures = tokio::task::spawn_blocking(move || loader.load_all())
            .await
            .map_err(|e| ServeError::Server(format!("loading the repository: {e}")))?;
        for (model, e) in &failures {
            warn!(model = %model, "not serving: {e}");
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let state = HttpState {
            manager: manager.clone(),
            control_token: config.control_token.clone(),
        };

        // Bad certificate or key files fail the start before any port is bound.
        let tls = config.tls.as_ref().map(TlsConfig::server_config).transpose()?;
        let grpc_tls = config.tls.as_ref().map(TlsConfig::grpc_config).transpose()?;
        let http = bind(config.http_addr).await?;
        let http_addr = http.local_addr().map_err(|e| ServeError::Server(e.to_string()))?;
        let app = http_router(state.clone(), config.max_body_bytes);
        let shutdown = stopped(stop_rx.clone());
        let scheme = if tls.is_some() { "https" } else { "http" };
        tasks.push((
            "http",
            match tls {
                Some(tls) => {
                    let listener = TlsListener::new(http, tls).map_err(|e| ServeError::Server(e.to_string()))?;
                    tokio::spawn(async move {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(shutdown)
                            .await
                            .map_err(|e| e.to_string())
                    })
                }
                None => tokio::spawn(async move {
                    axum::serve(http, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                        .map_err(|e| e.to_string())
                }),
            },
        ));
        info!(%http_addr, scheme, "KServe v2 HTTP and TF-Serving REST listening");

        let grpc_addr = match config.grpc_addr {
            Some(addr) => {
                let listener = bind(addr).await?;
                let local = listener.local_addr().map_err(|e| ServeError::Server(e.to_string()))?;
                let svc = GrpcInferenceServiceServer::new(
                    KServeGrpc::new(manager.clone()).with_control_token(config.control_token.clone()),
                )
                .max_decoding_message_size(config.max_body_bytes)
                .max_encoding_message_size(usize::MAX);
                // TF Serving's PredictionService and ModelService on the same port.
                let tf = TfServingGrpc::new(manager.clone(), config.max_body_bytes);
                let tf_predict = PredictionServiceServer::new(tf.clone())
                    .max_decoding_message_size(config.max_body_bytes)
                    .max_encoding_message_size(usize::MAX);
                let tf_models = ModelServiceServer::new(tf);
                let shutdown = stopped(stop_rx.clone());
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let mut builder = tonic::transport::Server::builder();
                if let Some(t) = grpc_tls {
                    builder = builder
                        .tls_config(t)
                        .map_err(|e| ServeError::Server(format!("gRPC TLS: {e}")))?;
                }
                tasks.push((
                    "grpc",
                    tokio::spawn(async move {
                        builder
                            .add_service(svc)
                            .add_service(tf_predict)
                            .add_service(tf_models)
                            .serve_with_incoming_shutdown(incoming, shutdown)
                            .await
                            .map_err(|e| e.to_string())
                    }),
                ));
                info!(grpc_addr = %local, "KServe v2 and TF-Serving gRPC listening");
                Some(local)
            }
            None => None,
        };

        let metrics_addr = match config.metrics_addr {
            Some(addr) => {
                let listener = bind(addr).await?;
                let local = listener.local_addr().map_err(|e| ServeError::Server(e.to_string()))?;
                let app = metrics_router(state.clone());
                let shutdown = stopped(stop_rx.clone());
                tasks.push((
                    "metrics",
                    tokio::spawn(async move {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(shutdown)
                            .await
                            .map_err(|e| e.to_string())
                    }),
                ));
                info!(metrics_addr = %local, "metrics listening");
                Some(local)
            }
            None => None,
        };

        if let Some(interval) = config.poll_interval {
            let poller = manager.clone();
            let mut rx = stop_rx.clone();
            tasks.push((
                "poll",
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(interval) => {}
                            _ = rx.wait_for(|s| *s) => return Ok(()),
                        }
                        let m = poller.clone();
                        if let Err(e) = tokio::task::spawn_blocking(move || m.poll()).await {
                            error!("repository poll panicked: {e}");
                        }
                    }
                }),
            ));
        }
        Ok(Server {
            http_addr,
            grpc_addr,
            metrics_addr,
            manager,
            stop,
            tasks,
        })
    }

    pub fn manager(&self) -> &Arc<ModelManager> {
        &self.manager
    }

    /// Stops accepting, waits for in-flight requests to finish, then returns.
    pub async fn shutdown(self) -> Result<()> {
        info!("shutting down: draining in-flight requests");
        self.manager.set_not_ready();
        let _ = self.stop.send(true);
        let mut first_err = None;
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error!("{name} server: {e}");
                    first_err.get_or_insert(ServeError::Server(format!("{name}: {e}")));
                }
                Err(e) => {
                    first_err.get_or_insert(ServeError::Server(format!("{name} task: {e}")));
                }
            }
        }
        info!("stopped");
        first_err.map_or(Ok(()), Err)
    }
}
