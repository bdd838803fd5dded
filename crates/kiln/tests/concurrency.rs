//! One `Session` shared by 8 threads gives every thread correct outputs.

mod common;

use std::sync::Arc;

use common::*;
use kiln::{Session, TensorData};

#[test]
fn one_session_eight_threads() {
    let s = Arc::new(Session::builder().build_from_bytes(&bytes(&small_model())).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for i in 0..50 {
                    let rows = 1 + (t + i) % 5;
                    let x: Vec<f32> = (0..rows * 4)
                        .map(|k| (k as f32 - 7.0) * 0.25 + t as f32 + i as f32 * 0.01)
                        .collect();
                    let input = TensorData::from_values("x", vec![rows, 4], &x).unwrap();
                    let y = s.run(vec![("x".into(), input)]).unwrap();
                    assert_eq!(y[0].dims, vec![rows, 4]);
                    assert_eq!(y[0].values::<f32>().unwrap(), small_model_ref(&x));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread panicked");
    }
}
