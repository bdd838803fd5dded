use kiln_graph::DType;

use crate::{Result, RuntimeError, Tensor};

/// A run-time value: a tensor, a sequence of tensors, or an optional.
#[derive(Debug, Clone)]
pub enum Value {
    Tensor(Tensor),
    Sequence(Vec<Tensor>, Option<DType>),
    Optional(Option<Box<Value>>, Option<DType>),
}

impl Value {
    pub fn as_tensor(&self) -> Result<&Tensor> {
        match self {
            Value::Tensor(t) => Ok(t),
            Value::Sequence(..) => Err(RuntimeError::msg("expected a tensor, got a sequence")),
            Value::Optional(..) => Err(RuntimeError::msg("expected a tensor, got an optional")),
        }
    }

    pub fn into_tensor(self) -> Result<Tensor> {
        match self {
            Value::Tensor(t) => Ok(t),
            _ => Err(RuntimeError::msg("expected a tensor")),
        }
    }

    /// Bytes held (for memory accounting).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Value::Tensor(t) => t.size_in_bytes(),
            Value::Sequence(ts, _) => ts.iter().map(Tensor::size_in_bytes).sum(),
            Value::Optional(v, _) => v.as_ref().map_or(0, |v| v.size_in_bytes()),
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Tensor(t)
    }
}
