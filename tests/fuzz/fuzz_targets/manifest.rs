//! YAML manifests from Git: the operator's per-file parse + validation, the shared
//! multi-document parser, and the operator -> node contract: a Workload the operator accepts
//! must survive the JSON hop to the node and be accepted there unchanged.
#![no_main]

use std::sync::Arc;

use hyperbox_api::validate::{
    parse_documents, parse_json_workload, validate_workload, ParsedDocument,
};
use hyperbox_operator::manifests::{assemble, parse_file};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = Arc::new(parse_file(data));
    // Rendering reports and duplicate detection over the same file twice.
    let set = assemble(vec![
        ("a.yaml".to_string(), parsed.clone()),
        ("b.yaml".to_string(), parsed),
    ]);
    let _ = set.error_count();

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = parse_documents(text) else {
        return;
    };
    for d in docs {
        if let ParsedDocument::Workload(w) = d {
            let errors = validate_workload(&w);
            assert!(
                errors.is_empty(),
                "accepted workload fails validation: {errors:?}"
            );
            let json = serde_json::to_value(&*w).expect("workload serializes to json");
            match parse_json_workload(json) {
                Ok(back) => assert_eq!(back, *w, "workload changed across the json hop"),
                Err(e) => panic!("node refuses a workload the operator accepted: {e:?}"),
            }
        }
    }
});
