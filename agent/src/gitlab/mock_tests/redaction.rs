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
    let err = c.verify(&t, "r_0123456789ab", &info()).await.unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("fake.r"), "{text}");
    assert!(text.contains(" glrt-…"), "{text}");
    let err = c.delete_manager(&t, "r_0123456789ab").await.unwrap_err();
    assert!(err.to_string().ends_with("bad: glpat-…xxxx"), "{err}");
}
