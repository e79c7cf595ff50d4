//! The dashboard served at `/` by every peer: one HTML page, a stylesheet and a script,
//! embedded in the binary (no CDN, no build step). The script polls this peer's JSON API
//! (`/api/v1/status`, `/peers`, `/tasks`, a task's `/logs`) and draws the whole mesh.
//!
//! Everything the mesh says (task commands, tags, errors, logs) is hostile input: the script
//! writes it with `textContent`/`append`, never as markup, and the page is served with a
//! Content-Security-Policy that allows scripts and styles from this origin only (no inline
//! script, no `eval`), so an injected tag could not run even if one slipped through.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page.
pub const INDEX_HTML: &str = include_str!("index.html");
/// The script: polling, rendering, logs, cancel.
pub const APP_JS: &str = include_str!("app.js");
/// The stylesheet.
pub const STYLE_CSS: &str = include_str!("style.css");
/// The tab icon.
pub const ICON_SVG: &str = include_str!("icon.svg");

/// Upper bound on the embedded assets together: the page must stay fast on a weak edge box.
pub const MAX_ASSET_BYTES: usize = 150 * 1024;

/// The policy every dashboard response carries: this origin's script, style, images and API
/// only; no inline script or style, no plugins, no framing, no form posts elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Every asset with its path and content type.
pub const ASSETS: [(&str, &str, &str); 4] = [
    ("/", "text/html; charset=utf-8", INDEX_HTML),
    ("/ui/app.js", "text/javascript; charset=utf-8", APP_JS),
    ("/ui/style.css", "text/css; charset=utf-8", STYLE_CSS),
    ("/ui/icon.svg", "image/svg+xml", ICON_SVG),
];

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Small, and a new binary may ship new ones: ask each time (a 200 is cheap).
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The dashboard's routes, to merge into the API router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new();
    for (path, content_type, body) in ASSETS {
        r = r.route(path, get(move || async move { asset(content_type, body) }));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_stay_under_the_size_limit() {
        let total: usize = ASSETS.iter().map(|(_, _, body)| body.len()).sum();
        assert!(
            total <= MAX_ASSET_BYTES,
            "dashboard assets are {total} bytes, over {MAX_ASSET_BYTES}"
        );
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_only_its_own_files() {
        let html = INDEX_HTML.to_ascii_lowercase();
        // Every <script> names a same-origin file and holds nothing.
        for (i, _) in html.match_indices("<script") {
            let tag_end = i + html[i..].find('>').expect("unclosed <script");
            let tag = &html[i..=tag_end];
            assert!(
                tag.contains("src=\"/ui/"),
                "inline or foreign script: {tag}"
            );
            assert!(
                html[tag_end + 1..].starts_with("</script>"),
                "script element with a body: {tag}"
            );
        }
        assert!(!html.contains("<style"), "inline <style> element");
        assert!(!html.contains(" style="), "inline style attribute");
        assert!(!html.contains("javascript:"), "javascript: URL");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "a foreign URL (CDN?)"
        );
        // No inline event handlers (onclick=, onload=, ...).
        for (i, _) in html.match_indices(" on") {
            let word: String = html[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            assert!(
                !html[i + 1 + word.len()..].starts_with('='),
                "inline event handler {word}="
            );
        }
    }

    #[test]
    fn the_script_never_writes_markup() {
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(bad), "app.js uses {bad}");
        }
    }

    #[test]
    fn the_policy_forbids_inline_and_foreign_code() {
        let csp = CONTENT_SECURITY_POLICY;
        assert!(csp.contains("default-src 'none'"));
        assert!(csp.contains("script-src 'self'"));
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert!(!csp.contains('*') && !csp.contains("http"));
    }
}
