//! The node API's apply body: JSON with a "workloads" array, each item parsed and validated,
//! names unique. Accepted batches must be valid and free of duplicate names, and must survive
//! a re-encode (what the operator's client sends).
#![no_main]

use std::collections::HashSet;

use hyperbox_api::validate::validate_workload;
use hyperbox_node::api::parse_apply_body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_apply_body(data) {
        Ok(workloads) => {
            let mut names = HashSet::new();
            for w in &workloads {
                assert!(validate_workload(w).is_empty());
                assert!(
                    names.insert(w.metadata.name.clone()),
                    "duplicate name accepted"
                );
            }
            let body = serde_json::to_vec(&serde_json::json!({ "workloads": workloads }))
                .expect("workloads serialize");
            let again = parse_apply_body(&body).expect("re-encoded accepted body is accepted");
            assert_eq!(again, workloads);
        }
        Err((msg, _fields)) => assert!(!msg.is_empty()),
    }
});
