//! Protocol-independent request and response types: every protocol converts its wire format
//! to an [`InferRequest`] and an [`InferResponse`] back.

use kiln::TensorData;

/// One inference request as the model manager sees it.
#[derive(Debug, Clone)]
pub struct InferRequest {
    pub model: String,
    /// `None`: the highest version being served.
    pub version: Option<u64>,
    /// Echoed in the response.
    pub id: Option<String>,
    /// Named inputs (the tensor's `name`).
    pub inputs: Vec<TensorData>,
    /// Outputs to return, in this order; empty means every model output in graph order.
    pub outputs: Vec<String>,
}

/// The answer to an [`InferRequest`].
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model: String,
    pub version: u64,
    pub id: Option<String>,
    /// Named outputs in the requested order.
    pub outputs: Vec<TensorData>,
    /// Whether the response came from the response cache.
    pub cached: bool,
}
