//! What the client sends: method, path under the base URL, headers, and the JSON body of each
//! call, with every token only where GitLab expects it.

use serde_json::Value;
use wiremock::Request;

use super::*;

async fn ok_to_everything() -> MockServer {
    let gitlab = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"id": 5, "token": "glrt-new.xxxx"})),
        )
        .mount(&gitlab)
        .await;
    Mock::given(method("DELETE"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&gitlab)
        .await;
    gitlab
}

/// The only request `gitlab` received.
async fn the_request(gitlab: &MockServer) -> Request {
    let mut requests = gitlab.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    requests.remove(0)
}

fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

fn body(r: &Request) -> Value {
    assert_eq!(header(r, "content-type"), Some("application/json"));
    serde_json::from_slice(&r.body).unwrap()
}

fn full_settings() -> RunnerSettings {
    RunnerSettings {
        tags: vec!["nix".into(), "vm".into()],
        run_untagged: Some(false),
        locked: Some(true),
        access_level: Some(crate::config::AccessLevel::RefProtected),
        maximum_timeout: Some(std::time::Duration::from_secs(3600)),
    }
}

fn expected_info() -> Value {
    json!({
        "name": "vm-test",
        "version": concat!("gitlab-runner-vm ", env!("CARGO_PKG_VERSION")),
        "platform": std::env::consts::OS,
        "architecture": std::env::consts::ARCH,
        "executor": "shell",
    })
}

#[tokio::test]
async fn verify_sends_the_token_system_id_and_info_in_its_body() {
    let gitlab = ok_to_everything().await;
    client(&gitlab)
        .verify(&secret(TOKEN), SYSTEM_ID, &info())
        .await
        .unwrap();
    let r = the_request(&gitlab).await;
    assert_eq!(
        (r.method.as_str(), r.url.path()),
        ("POST", "/api/v4/runners/verify")
    );
    assert_eq!(
        header(&r, "user-agent"),
        Some(concat!("gitlab-runner-vm/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(header(&r, "private-token"), None);
    assert_eq!(r.url.query(), None);
    assert_eq!(
        body(&r),
        json!({"token": TOKEN, "system_id": SYSTEM_ID, "info": expected_info()})
    );
}

#[tokio::test]
async fn register_sends_the_runner_fields_that_are_set() {
    let gitlab = ok_to_everything().await;
    let reg = secret("GR1348941fake.registration.xxxx");
    client(&gitlab)
        .register(&reg, &info(), &full_settings())
        .await
        .unwrap();
    let r = the_request(&gitlab).await;
    assert_eq!(
        (r.method.as_str(), r.url.path()),
        ("POST", "/api/v4/runners")
    );
    assert_eq!(
        body(&r),
        json!({
            "description": "vm-test",
            "tag_list": ["nix", "vm"],
            "run_untagged": false,
            "locked": true,
            "access_level": "ref_protected",
            "maximum_timeout": 3600,
            "token": "GR1348941fake.registration.xxxx",
            "info": expected_info(),
        })
    );
    // Unset fields are left to GitLab's defaults.
    let gitlab = ok_to_everything().await;
    client(&gitlab)
        .register(&reg, &info(), &RunnerSettings::default())
        .await
        .unwrap();
    let body = body(&the_request(&gitlab).await);
    let mut keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["description", "info", "token"]);
}

#[tokio::test]
async fn create_user_runner_sends_the_access_token_as_private_token_only() {
    for (kind, extra) in [
        (
            RunnerType::Instance,
            json!({"runner_type": "instance_type"}),
        ),
        (
            RunnerType::Group(3),
            json!({"runner_type": "group_type", "group_id": 3}),
        ),
        (
            RunnerType::Project(42),
            json!({"runner_type": "project_type", "project_id": 42}),
        ),
    ] {
        let gitlab = ok_to_everything().await;
        let created = client(&gitlab)
            .create_user_runner(&secret(ACCESS), &kind, &info(), &full_settings())
            .await
            .unwrap();
        assert_eq!(created.id, Some(5));
        let r = the_request(&gitlab).await;
        assert_eq!(
            (r.method.as_str(), r.url.path()),
            ("POST", "/api/v4/user/runners")
        );
        assert_eq!(header(&r, "private-token"), Some(ACCESS));
        let mut expected = json!({
            "description": "vm-test",
            "tag_list": ["nix", "vm"],
            "run_untagged": false,
            "locked": true,
            "access_level": "ref_protected",
            "maximum_timeout": 3600,
        });
        for (k, v) in extra.as_object().unwrap() {
            expected[k] = v.clone();
        }
        // No token and no info in the body: the access token is a header.
        assert_eq!(body(&r), expected, "{kind:?}");
    }
}

#[tokio::test]
async fn deletions_send_the_runner_token_and_the_managers_system_id() {
    let gitlab = ok_to_everything().await;
    let c = client(&gitlab);
    c.delete_manager(&secret(TOKEN), SYSTEM_ID).await.unwrap();
    let r = the_request(&gitlab).await;
    assert_eq!(
        (r.method.as_str(), r.url.path()),
        ("DELETE", "/api/v4/runners/managers")
    );
    assert_eq!(body(&r), json!({"token": TOKEN, "system_id": SYSTEM_ID}));
    let gitlab = ok_to_everything().await;
    client(&gitlab).delete_runner(&secret(TOKEN)).await.unwrap();
    let r = the_request(&gitlab).await;
    assert_eq!(
        (r.method.as_str(), r.url.path()),
        ("DELETE", "/api/v4/runners")
    );
    assert_eq!(body(&r), json!({"token": TOKEN}));
}

#[tokio::test]
async fn the_api_is_found_under_the_base_url_with_or_without_a_slash() {
    for suffix in ["", "/", "/gitlab", "/gitlab/"] {
        let gitlab = ok_to_everything().await;
        let c = Client::new(&format!("{}{suffix}", gitlab.uri()), None).unwrap();
        c.verify(&secret(TOKEN), SYSTEM_ID, &info()).await.unwrap();
        let r = the_request(&gitlab).await;
        let prefix = suffix.trim_end_matches('/');
        assert_eq!(
            r.url.path(),
            format!("{prefix}/api/v4/runners/verify"),
            "{suffix:?}"
        );
    }
}
