//! `/logging` on a real admin server with the process's own subscriber: what a binary
//! gets from `init_tracing` and `AdminServers::start` without code of its own. One
//! test: the subscriber is global to this test binary.

#![expect(
    clippy::unwrap_used,
    reason = "test: a failed unwrap is a failed test, with its location"
)]

use ambit_runtime::{
    AdminArgs, AdminServers, LogArgs, LogFormat,
    admin::{get, post},
    logging::LogControl,
    readiness::Readiness,
};
use http::StatusCode;

async fn text(result: (StatusCode, bytes::Bytes)) -> (StatusCode, String) {
    (result.0, String::from_utf8(result.1.to_vec()).unwrap())
}

#[tokio::test]
async fn logging_shows_and_changes_the_filter_and_refuses_invalid_ones() {
    ambit_runtime::init_tracing(&LogArgs {
        log_format: LogFormat::Json,
        log_level: "info".to_owned(),
    })
    .unwrap();
    assert!(LogControl::global().is_some());
    let args = AdminArgs {
        readiness_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
    };
    let servers = AdminServers::start(&args, &Readiness::new(), Vec::new())
        .await
        .unwrap();
    let admin = servers.admin_addr;

    let shown = text(get(admin, "/logging").await.unwrap()).await;
    assert_eq!(shown, (StatusCode::OK, "info\n".to_owned()));
    assert!(!tracing::enabled!(tracing::Level::DEBUG));

    // Invalid or missing directives: 400 with the reason, the filter unchanged.
    for bad in [
        "/logging?level=ambit_node%3Dloudest",
        "/logging?level=",
        "/logging",
        "/logging?level=%zz",
    ] {
        let (status, body) = text(post(admin, bad).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(!body.is_empty(), "{bad}");
    }
    let (_, body) = text(
        post(admin, "/logging?level=ambit_node%3Dloudest")
            .await
            .unwrap(),
    )
    .await;
    assert!(
        body.contains("invalid log filter \"ambit_node=loudest\"")
            && body.contains("stays \"info\""),
        "{body}"
    );
    assert_eq!(
        text(get(admin, "/logging").await.unwrap()).await.1,
        "info\n"
    );
    assert!(!tracing::enabled!(tracing::Level::DEBUG));

    // A valid filter applies at once, to events anywhere in the process.
    let (status, body) = text(
        post(admin, "/logging?level=ambit_node=trace,debug")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        text(get(admin, "/logging").await.unwrap()).await.1,
        "ambit_node=trace,debug\n"
    );
    assert!(tracing::enabled!(tracing::Level::DEBUG));
    assert!(!tracing::enabled!(tracing::Level::TRACE));
    assert!(tracing::enabled!(target: "ambit_node::pods", tracing::Level::TRACE));

    // Not on the readiness port, and not with other methods.
    let (status, _) = get(servers.readiness_addr, "/logging").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    servers.shutdown().await;
}
