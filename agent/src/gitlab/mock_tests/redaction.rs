//! No secret leaves through an error: known tokens are masked, token-shaped text and URL user
//! info are scrubbed, before anything is cut to length.

use super::*;

/// Issue item 15: error bodies were cut to 200 characters before redaction.
#[tokio::test]
async fn error_bodies_are_redacted_and_scrubbed_before_they_are_cut() {
    let gitlab = MockServer::start().await;
    let echo = format!("{} {TOKEN} and more", "x".repeat(190));
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(403).set_body_raw(echo, "text/plain"),
    )
    .await;
    answer(
        &gitlab,
        "DELETE",
        "/api/v4/runners/managers",
        ResponseTemplate::new(400)
            .set_body_json(json!({"message": "bad: glpat-other.token.xxxxxxxxxxxx"})),
    )
    .await;
    let c = client(&gitlab);
    let t = secret(TOKEN);
    let err = c.verify(&t, SYSTEM_ID, &info()).await.unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("fake.r"), "{text}");
    assert!(text.contains(" glrt-…"), "{text}");
    let err = c.delete_manager(&t, SYSTEM_ID).await.unwrap_err();
    assert!(err.to_string().ends_with("bad: glpat-…xxxx"), "{err}");
}

/// A secret in the `message` field, a MaybeCreated detail, or the content type of an answer
/// that is not JSON.
#[tokio::test]
async fn every_text_from_the_server_is_redacted() {
    let gitlab = MockServer::start().await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(401)
            .set_body_json(json!({"message": format!("token {TOKEN} is invalid")})),
    )
    .await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/user/runners",
        ResponseTemplate::new(502).set_body_raw(format!("upstream said {ACCESS}"), "text/plain"),
    )
    .await;
    answer(
        &gitlab,
        "DELETE",
        "/api/v4/runners/managers",
        ResponseTemplate::new(200).set_body_raw("<html/>", &format!("text/html; x={TOKEN}")),
    )
    .await;
    let c = client(&gitlab);
    let (t, i) = (secret(TOKEN), info());
    let err = c.verify(&t, SYSTEM_ID, &i).await.unwrap_err();
    assert!(
        err.to_string().ends_with(": token glrt-…6789 is invalid"),
        "{err}"
    );
    let access = secret(ACCESS);
    let err = c
        .create_user_runner(
            &access,
            &RunnerType::Instance,
            &i,
            &RunnerSettings::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::MaybeCreated { .. }), "{err:?}");
    assert!(
        err.to_string().ends_with("502: upstream said glpat-…xxxx"),
        "{err}"
    );
    let err = c.delete_manager(&t, SYSTEM_ID).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ApiError::Body { .. }), "{err:?}");
    assert!(
        text.contains("of type text/html; x=glrt-…6789 that"),
        "{text}"
    );
    for text in [text, format!("{err:?}")] {
        assert!(!text.contains("fake.runner"), "{text}");
    }
}

/// A message is cut after `MAX_MESSAGE_CHARS` characters, not bytes, and never inside one.
#[tokio::test]
async fn a_message_is_cut_at_a_character_count() {
    for (body, expected) in [
        ("é".repeat(MAX_MESSAGE_CHARS), "é".repeat(MAX_MESSAGE_CHARS)),
        (
            "é".repeat(MAX_MESSAGE_CHARS + 1),
            format!("{}…", "é".repeat(MAX_MESSAGE_CHARS)),
        ),
    ] {
        let gitlab = MockServer::start().await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(400).set_body_raw(body, "text/plain"),
        )
        .await;
        let err = client(&gitlab)
            .verify(&secret(TOKEN), SYSTEM_ID, &info())
            .await
            .unwrap_err();
        let ApiError::Status { message, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(message, expected);
    }
}

/// Network errors name the URL and every cause, but not the user info a base URL may carry
/// (reqwest leaves it out; the scrub would catch it otherwise).
#[tokio::test]
async fn a_network_error_shows_no_user_info() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let c = Client::new(&format!("http://user:s3cr3t.pw@{addr}"), None).unwrap();
    let err = c
        .verify(&secret(TOKEN), SYSTEM_ID, &info())
        .await
        .unwrap_err();
    let ApiError::Transport { detail, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(!detail.contains("s3cr3t"), "{detail}");
    // The whole chain of causes, down to the system's reason.
    assert!(
        detail.starts_with(&format!(
            "error sending request for url (http://{addr}/api/v4/runners/verify): "
        )),
        "{detail}"
    );
    assert!(detail.contains("Connection refused"), "{detail}");
    assert!(!err.to_string().contains("user:"), "{err}");
}
