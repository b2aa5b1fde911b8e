//! Registry responses decoded as the node decodes them: image manifests, indexes (and the
//! untagged either-of) with oci-client's types, and the image config with the node's parser.
#![no_main]

use hyperbox_node::images::parse_image_config;
use hyperbox_unpack::Compression;
use libfuzzer_sys::fuzz_target;
use oci_client::manifest::{OciImageIndex, OciImageManifest, OciManifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<OciImageManifest>(data) {
        for l in &m.layers {
            let _ = Compression::from_media_type(&l.media_type);
        }
        let _ = serde_json::to_vec(&m).expect("manifest re-serializes");
    }
    if let Ok(i) = serde_json::from_slice::<OciImageIndex>(data) {
        let _ = serde_json::to_vec(&i).expect("index re-serializes");
    }
    let _ = serde_json::from_slice::<OciManifest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = parse_image_config(text) {
            let _ = serde_json::to_vec(&c).expect("image config re-serializes");
        }
        let _ = hyperbox_node::images::auth_from_docker_config(text, "docker.io");
        let _ = hyperbox_api::reference::ImageRef::parse(text.trim());
    }
});
