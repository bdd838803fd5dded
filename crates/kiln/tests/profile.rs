//! Per-node profiling (`RunOptions::profile`): subgraph nodes are timed and attributed.

mod common;

use common::*;
use kiln::internals::onnx::proto;
use kiln::{Level, OpTime, RunOptions, Session, TensorData};

/// y = If(c) then Relu(x) * 2 else Neg(x), with the branches reading x from the outer scope.
fn if_model() -> proto::ModelProto {
    let branch = |name: &str, nodes: Vec<proto::NodeProto>| proto::GraphProto {
        name: Some(name.into()),
        node: nodes,
        output: vec![value(&format!("{name}_y"), 1, &[-1, 4])],
        ..Default::default()
    };
    let then_g = branch(
        "then",
        vec![
            node("Relu", "then_relu", &["x"], &["then_r"]),
            node("Add", "then_add", &["then_r", "then_r"], &["then_y"]),
        ],
    );
    let else_g = branch("else", vec![node("Neg", "else_neg", &["x"], &["else_y"])]);
    let mut if_node = node("If", "the_if", &["c"], &["y"]);
    for (name, g) in [("then_branch", then_g), ("else_branch", else_g)] {
        if_node.attribute.push(proto::AttributeProto {
            name: Some(name.into()),
            r#type: Some(proto::attribute_proto::AttributeType::Graph as i32),
            g: Some(g),
            ..Default::default()
        });
    }
    model(
        vec![if_node],
        vec![value("c", 9, &[]), value("x", 1, &[-1, 4])],
        vec![value("y", 1, &[-1, 4])],
        vec![],
    )
}

#[test]
fn profile_times_subgraph_nodes_and_keeps_self_times() {
    let session = Session::builder()
        .optimization(Level::Disabled)
        .build_from_bytes(&bytes(&if_model()))
        .unwrap();
    let x = TensorData::from_values("x", vec![2, 4], &[1.0f32, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0]).unwrap();
    let c = TensorData::from_values("c", vec![], &[true]).unwrap();
    let options = RunOptions {
        profile: true,
        ..RunOptions::default()
    };
    let (out, stats) = session
        .run_with_options(vec![("c".into(), c), ("x".into(), x)], &options)
        .unwrap();
    assert_eq!(
        out[0].values::<f32>().unwrap(),
        vec![2.0, 0.0, 6.0, 0.0, 10.0, 0.0, 14.0, 0.0]
    );

    // The then-branch's two nodes (depth 1) come before the If (depth 0) that ran them.
    let seen: Vec<(&str, u32)> = stats.op_times.iter().map(|t| (t.node.as_str(), t.depth)).collect();
    assert_eq!(seen, vec![("then_relu", 1), ("then_add", 1), ("the_if", 0)]);
    let own = OpTime::self_times(&stats.op_times);
    let children = stats.op_times[0].duration + stats.op_times[1].duration;
    assert_eq!(own[2], stats.op_times[2].duration - children);
    assert_eq!(own[0], stats.op_times[0].duration);

    // A run without profiling records nothing, and the thread's nested buffer does not leak
    // into the next profiled run.
    let (_, quiet) = session
        .run_with_stats(vec![
            ("c".into(), TensorData::from_values("c", vec![], &[false]).unwrap()),
            (
                "x".into(),
                TensorData::from_values("x", vec![1, 4], &[1.0f32; 4]).unwrap(),
            ),
        ])
        .unwrap();
    assert!(quiet.op_times.is_empty());
}

#[test]
fn self_times_of_nested_entries() {
    use std::time::Duration;
    let t = |node: &str, ms: u64, depth: u32| OpTime {
        node: node.into(),
        op: "X".into(),
        duration: Duration::from_millis(ms),
        depth,
    };
    // outer(10) ran [a(2), inner(5) ran [b(1), c(3)]], then d(4) at the top.
    let times = vec![
        t("a", 2, 1),
        t("b", 1, 2),
        t("c", 3, 2),
        t("inner", 5, 1),
        t("outer", 10, 0),
        t("d", 4, 0),
    ];
    let own: Vec<u64> = OpTime::self_times(&times)
        .iter()
        .map(|d| d.as_millis() as u64)
        .collect();
    assert_eq!(own, vec![2, 1, 3, 1, 3, 4]);
}

/// Profiled runs from several threads at once, each on a pool worker (the default): a worker that
/// waits inside one run's parallel GEMM may pick up another caller's whole run, and that run must
/// still report its own nodes at depth 0 (not as nested in the first) and nothing of the other's.
#[test]
fn concurrent_profiled_runs_keep_their_own_times() {
    let k = 256;
    let w: Vec<f32> = (0..k * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 64.0).collect();
    let m = model(
        vec![
            node("MatMul", "mm", &["x", "w"], &["h"]),
            node("Relu", "relu", &["h"], &["y"]),
        ],
        vec![value("x", 1, &[-1, k as i64])],
        vec![value("y", 1, &[-1, k as i64])],
        vec![f32_tensor("w", &[k as i64, k as i64], &w)],
    );
    let session = Session::builder()
        .optimization(Level::Disabled)
        .build_from_bytes(&bytes(&m))
        .unwrap();
    assert!(session.run_options().on_thread_pool, "the library default");
    let options = RunOptions {
        profile: true,
        ..session.run_options().clone()
    };
    std::thread::scope(|s| {
        for t in 0..4 {
            let (session, options) = (&session, &options);
            s.spawn(move || {
                for i in 0..25 {
                    let rows = 64 + 32 * ((t + i) % 4);
                    let x = TensorData::from_values("x", vec![rows, k], &vec![0.5f32; rows * k]).unwrap();
                    let (_, stats) = session.run_with_options(vec![("x".into(), x)], options).unwrap();
                    let seen: Vec<(&str, u32)> = stats.op_times.iter().map(|t| (t.node.as_str(), t.depth)).collect();
                    assert_eq!(seen, vec![("mm", 0), ("relu", 0)], "thread {t} run {i}");
                }
            });
        }
    });
}
