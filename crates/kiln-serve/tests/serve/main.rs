//! End-to-end tests of `kiln serve` over real sockets on localhost (ephemeral ports): every
//! answer is compared with a direct `Session::run` on the same model file.

mod batching;
mod common;
mod grpc;
mod hostile;
mod http;
mod llm;
mod llm_generate;
mod reload;
mod security;
mod tf_grpc;
mod tf_rest;
