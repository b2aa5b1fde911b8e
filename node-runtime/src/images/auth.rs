//! Registry credentials from a docker `config.json`.

use super::*;

impl ImageStore {
    pub(super) fn auth_for(&self, registry: &str) -> Result<RegistryAuth, ImageError> {
        let Some(path) = &self.cfg.auth_file else {
            return Ok(RegistryAuth::Anonymous);
        };
        let text = fs::read_to_string(path).map_err(|e| {
            ImageError::Pull(format!("read registry credentials {}: {e}", path.display()))
        })?;
        auth_from_docker_config(&text, registry)
            .map_err(|e| ImageError::Pull(format!("{}: {e}", path.display())))
    }
}

/// Credentials for `registry` from a docker `config.json`: `auths` keyed by host (optionally
/// with a scheme), each with `auth` (base64 `user:password`) or `username`/`password`.
pub fn auth_from_docker_config(text: &str, registry: &str) -> Result<RegistryAuth, String> {
    use base64::Engine;
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
        #[serde(default, rename = "identitytoken")]
        identity_token: Option<String>,
    }
    let f: File =
        serde_json::from_str(text).map_err(|e| format!("not a docker config.json: {e}"))?;
    let host_of = |k: &str| {
        k.trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string()
    };
    let wanted = if registry == "docker.io" {
        "index.docker.io"
    } else {
        registry
    };
    let entry = f
        .auths
        .iter()
        .find(|(k, _)| host_of(k) == registry || host_of(k) == wanted)
        .map(|(_, v)| v);
    let Some(e) = entry else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &e.identity_token {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(a) = &e.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| format!("auths.{registry}.auth is not base64: {e}"))?;
        let s = String::from_utf8(decoded)
            .map_err(|_| format!("auths.{registry}.auth is not utf-8"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| format!("auths.{registry}.auth must encode user:password"))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    Err(format!("auths.{registry} has no credentials"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auth_forms() {
        let cfg = r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"},"https://reg.example/v2/":{"username":"a","password":"b"}}}"#;
        assert!(
            matches!(auth_from_docker_config(cfg, "127.0.0.1:5000").unwrap(), RegistryAuth::Basic(u, p) if u == "user" && p == "pass")
        );
        assert!(
            matches!(auth_from_docker_config(cfg, "reg.example").unwrap(), RegistryAuth::Basic(u, _) if u == "a")
        );
        assert!(matches!(
            auth_from_docker_config(cfg, "other:1").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(auth_from_docker_config("{\"auths\":{\"x\":{\"auth\":\"!!\"}}}", "x").is_err());
    }
}
