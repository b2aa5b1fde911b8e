//! Webhook signatures: never panic on any secret/body/header, accept the correct
//! `sha256=<hex>` HMAC of the body, and reject it once any single body byte changes.
#![no_main]

use hmac::{Hmac, Mac};
use hyperbox_operator::webhook::signature_valid;
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fuzz_target!(|data: &[u8]| {
    // Layout: [secret_len][header_len][secret][header][body...] (lengths capped by the input).
    if data.len() < 2 {
        return;
    }
    let (sl, hl) = (data[0] as usize, data[1] as usize);
    let rest = &data[2..];
    let sl = sl.min(rest.len());
    let (secret, rest) = rest.split_at(sl);
    let hl = hl.min(rest.len());
    let (header, body) = rest.split_at(hl);
    let header = String::from_utf8_lossy(header);

    // Arbitrary headers: no panic, and a random one is (practically) never accepted.
    let accepted = signature_valid(secret, body, &header);
    let good = sign(secret, body);
    if accepted {
        assert_eq!(
            header.trim().to_ascii_lowercase(),
            good,
            "accepted a header that is not the HMAC of the body"
        );
    }

    assert!(
        signature_valid(secret, body, &good),
        "correct signature refused"
    );
    assert!(signature_valid(secret, body, &format!("  {good} ")));
    if body.is_empty() {
        assert!(!signature_valid(secret, b"x", &good));
        return;
    }
    let mut tampered = body.to_vec();
    let i = (secret.len() + header.len()) % tampered.len();
    let flip = (data[0] | 1) & 0xff;
    tampered[i] ^= flip;
    assert!(
        !signature_valid(secret, &tampered, &good),
        "tampered body accepted"
    );
    // A truncated or extended body is another message.
    assert!(!signature_valid(secret, &body[..body.len() - 1], &good));
    let mut longer = body.to_vec();
    longer.push(0);
    assert!(!signature_valid(secret, &longer, &good));
});
