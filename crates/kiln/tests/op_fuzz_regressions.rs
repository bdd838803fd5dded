//! Single-node cases that differential fuzzing against ONNX Runtime (tests/fuzz/op_fuzz.py) found
//! wrong in Kiln; expected values are ONNX Runtime 1.32's outputs.

mod common;

use common::*;
use kiln::internals::onnx::proto;
use kiln::{Session, TensorData};

fn ints_attr(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(7),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(2),
        ..Default::default()
    }
}

fn str_attr(name: &str, v: &str) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(3),
        ..Default::default()
    }
}

/// Runs one node over the f32 input `x` (plus constant initializers) at opset 19.
fn run1(
    op: &str,
    inputs: &[&str],
    attrs: Vec<proto::AttributeProto>,
    x: (&[i64], &[f32]),
    inits: Vec<proto::TensorProto>,
) -> kiln::Result<(Vec<usize>, Vec<f32>)> {
    let mut n = node(op, "n", inputs, &["y"]);
    n.attribute = attrs;
    let mut m = model(vec![n], vec![value("x", 1, x.0)], vec![value("y", 1, &[])], inits);
    m.opset_import[0].version = Some(19);
    m.graph.as_mut().unwrap().output[0].r#type = Some(proto::TypeProto {
        value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
            elem_type: Some(1),
            shape: None,
        })),
        ..Default::default()
    });
    let s = Session::builder().build_from_bytes(&bytes(&m))?;
    let dims: Vec<usize> = x.0.iter().map(|&d| d as usize).collect();
    let input = TensorData::from_values("x", dims, x.1)?;
    let mut out = s.run(vec![("x".into(), input)])?;
    let y = out.remove(0);
    Ok((y.dims.clone(), y.values::<f32>().expect("f32 output")))
}

fn iota(n: usize) -> Vec<f32> {
    (1..=n).map(|v| v as f32).collect()
}

#[test]
fn slice_after_an_axis_sliced_to_nothing() {
    // Axis 0 becomes empty first; slicing axis 1 afterwards used to panic inside candle.
    let x = iota(60);
    let (dims, v) = run1(
        "Slice",
        &["x", "s", "e", "a", "st"],
        vec![],
        (&[5, 3, 4], &x),
        vec![
            i64_tensor("s", &[2], &[5, -1]),
            i64_tensor("e", &[2], &[0, -4]),
            i64_tensor("a", &[2], &[-3, -2]),
            i64_tensor("st", &[2], &[2, 1]),
        ],
    )
    .unwrap();
    assert_eq!(dims, vec![0, 0, 4]);
    assert!(v.is_empty());
}

#[test]
fn slice_negative_step_start_before_the_axis_clamps_to_zero() {
    // start -2 on a length-1 axis with step -2 clamps to 0 (not -1): one element.
    let x = iota(20);
    let (dims, v) = run1(
        "Slice",
        &["x", "s", "e", "a", "st"],
        vec![],
        (&[1, 5, 4], &x),
        vec![
            i64_tensor("s", &[2], &[-2, 1]),
            i64_tensor("e", &[2], &[i64::MIN, 2]),
            i64_tensor("a", &[2], &[0, 1]),
            i64_tensor("st", &[2], &[-2, 1]),
        ],
    )
    .unwrap();
    assert_eq!((dims, v), (vec![1, 1, 4], vec![5., 6., 7., 8.]));
}

#[test]
fn split_an_empty_tensor() {
    let mut n = node("Split", "n", &["x", "sp"], &["a", "b"]);
    n.attribute = vec![int_attr("axis", 1)];
    let mut m = model(
        vec![n],
        vec![value("x", 1, &[0, 3])],
        vec![value("a", 1, &[0, 2]), value("b", 1, &[0, 1])],
        vec![i64_tensor("sp", &[2], &[2, 1])],
    );
    m.opset_import[0].version = Some(18);
    let s = Session::builder().build_from_bytes(&bytes(&m)).unwrap();
    let out = s
        .run(vec![(
            "x".into(),
            TensorData::from_values::<f32>("x", vec![0, 3], &[]).unwrap(),
        )])
        .unwrap();
    assert_eq!(out[0].dims, vec![0, 2]);
    assert_eq!(out[1].dims, vec![0, 1]);
}

#[test]
fn pad_negative_and_positive_pads_on_one_axis() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let cases: &[(&str, [i64; 2], &[f32])] = &[
        ("constant", [-1, 4], &[2., 3., 4., 0., 0., 0., 0.]),
        ("constant", [4, -3], &[0., 0., 0., 0., 1.]),
        ("constant", [2, -1], &[0., 0., 1., 2., 3.]),
        ("edge", [-1, 4], &[2., 3., 4., 4., 4., 4., 4.]),
        ("edge", [4, -3], &[1., 1., 1., 1., 1.]),
        ("wrap", [2, -1], &[2., 3., 1., 2., 3.]),
        ("wrap", [-1, 4], &[2., 3., 4., 2., 3., 4., 2.]),
        ("reflect", [2, -1], &[3., 2., 1., 2., 3.]),
        ("reflect", [-1, 2], &[2., 3., 4., 3., 2.]),
    ];
    for (mode, pads, want) in cases {
        let (dims, v) = run1(
            "Pad",
            &["x", "p"],
            vec![str_attr("mode", mode)],
            (&[4], &x),
            vec![i64_tensor("p", &[2], pads)],
        )
        .unwrap();
        assert_eq!(dims, vec![want.len()], "{mode} {pads:?}");
        assert_eq!(v, *want, "{mode} {pads:?}");
    }
    // The padding reaches past a fully cropped input: all constant.
    let (dims, v) = run1(
        "Pad",
        &["x", "p"],
        vec![],
        (&[1], &[7.0]),
        vec![i64_tensor("p", &[2], &[6, -2])],
    )
    .unwrap();
    assert_eq!((dims, v), (vec![5], vec![0.0; 5]));
    // Nothing left to wrap from: an error, not values from outside the cropped input.
    let e = run1(
        "Pad",
        &["x", "p"],
        vec![str_attr("mode", "wrap")],
        (&[1], &[7.0]),
        vec![i64_tensor("p", &[2], &[-1, 2])],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no input elements left"), "{e}");
}

#[test]
fn conv_transpose_output_shape_and_same_padding() {
    let x = [1.0f32, 2.0, 3.0];
    let w = f32_tensor("w", &[1, 1, 3], &[1.0, 1.0, 1.0]);
    // Full output [1, 1, 3, 2, 5, 3, 3]; output_shape 4 drops total 3 as 2 at the start, 1 at the end.
    let ct = |attrs: Vec<proto::AttributeProto>| {
        run1("ConvTranspose", &["x", "w"], attrs, (&[1, 1, 3], &x), vec![w.clone()])
    };
    let (d, v) = ct(vec![ints_attr("strides", &[2]), ints_attr("output_shape", &[4])]).unwrap();
    assert_eq!((d, v), (vec![1, 1, 4], vec![3., 2., 5., 3.]));
    let (d, v) = ct(vec![
        ints_attr("strides", &[2]),
        ints_attr("output_shape", &[4]),
        str_attr("auto_pad", "SAME_UPPER"),
    ])
    .unwrap();
    assert_eq!((d, v), (vec![1, 1, 4], vec![1., 3., 2., 5.]));
    // One past the full size (less than a stride): zero-extended.
    let (d, v) = ct(vec![ints_attr("strides", &[2]), ints_attr("output_shape", &[8])]).unwrap();
    assert_eq!((d, v), (vec![1, 1, 8], vec![1., 1., 3., 2., 5., 3., 3., 0.]));
    assert!(ct(vec![ints_attr("strides", &[2]), ints_attr("output_shape", &[9])]).is_err());
    // SAME_UPPER where in*stride exceeds the full size: the full size, unpadded.
    let (d, v) = run1(
        "ConvTranspose",
        &["x", "w"],
        vec![ints_attr("strides", &[3]), str_attr("auto_pad", "SAME_UPPER")],
        (&[1, 1, 2], &[1.0, 2.0]),
        vec![f32_tensor("w", &[1, 1, 1], &[1.0])],
    )
    .unwrap();
    assert_eq!((d, v), (vec![1, 1, 4], vec![1., 0., 0., 2.]));
}

#[test]
fn pool_window_larger_than_the_padded_input() {
    let x = [1.0f32, 2.0];
    // span 5 over a padded length of 4: no window (an empty output, as ONNX Runtime).
    let (d, v) = run1(
        "MaxPool",
        &["x"],
        vec![
            ints_attr("kernel_shape", &[3]),
            ints_attr("dilations", &[2]),
            ints_attr("pads", &[1, 1]),
        ],
        (&[1, 1, 2], &x),
        vec![],
    )
    .unwrap();
    assert_eq!((d, v), (vec![1, 1, 0], vec![]));
    // span 5 over 3 with stride 4: one window.
    let (d, v) = run1(
        "MaxPool",
        &["x"],
        vec![
            ints_attr("kernel_shape", &[3]),
            ints_attr("dilations", &[2]),
            ints_attr("pads", &[1, 0]),
            ints_attr("strides", &[4]),
        ],
        (&[1, 1, 2], &x),
        vec![],
    )
    .unwrap();
    assert_eq!((d, v), (vec![1, 1, 1], vec![2.0]));
    // ...and with stride 1 the size is negative: an error.
    assert!(run1(
        "MaxPool",
        &["x"],
        vec![
            ints_attr("kernel_shape", &[3]),
            ints_attr("dilations", &[2]),
            ints_attr("pads", &[1, 0])
        ],
        (&[1, 1, 2], &x),
        vec![],
    )
    .is_err());
}

#[test]
fn split_num_outputs_larger_than_the_axis_is_an_error() {
    let mut n = node("Split", "n", &["x"], &["a", "b", "c", "d"]);
    n.attribute = vec![int_attr("num_outputs", 4)];
    let mut m = model(
        vec![n],
        vec![value("x", 1, &[2])],
        ["a", "b", "c", "d"].iter().map(|o| value(o, 1, &[1])).collect(),
        vec![],
    );
    m.opset_import[0].version = Some(18);
    let r = Session::builder().build_from_bytes(&bytes(&m)).and_then(|s| {
        s.run(vec![(
            "x".into(),
            TensorData::from_values("x", vec![2], &[1.0f32, 2.0]).unwrap(),
        )])
    });
    assert!(r.is_err());
}
