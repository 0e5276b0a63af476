//! Routing decisions for a fixed table, asserted one by one.

use super::text::escape_into;
use super::*;
use crate::config::UpstreamConfig;

fn loc(m: LocationMatch, path: &str, proxy: &str) -> LocationConfig {
    LocationConfig {
        match_: m,
        path: path.into(),
        proxy_pass: proxy.into(),
        ..Default::default()
    }
}

fn ret(status: u16, text: &str) -> Option<ReturnConfig> {
    Some(ReturnConfig {
        status,
        text: text.into(),
    })
}

fn rw(regex: &str, replacement: &str, flag: RewriteFlag) -> RewriteConfig {
    RewriteConfig {
        regex: regex.into(),
        replacement: replacement.into(),
        flag,
    }
}

fn config() -> Config {
    use LocationMatch::*;
    let mut c = Config {
        listen: "0.0.0.0:80".into(),
        ..Default::default()
    };
    c.upstream.name = "app".into();
    c.upstreams = vec![
        UpstreamConfig {
            name: "api".into(),
            ..Default::default()
        },
        UpstreamConfig {
            name: "static".into(),
            ..Default::default()
        },
    ];
    c.vhosts = vec![
        VhostConfig {
            listen: vec!["0.0.0.0:80".into()],
            names: vec!["example.com".into(), "*.example.com".into()],
            locations: vec![
                loc(Prefix, "/", "http://app"),
                loc(Prefix, "/api/", "http://api/v2/"),
                loc(Exact, "/exact", "http://static"),
                loc(PrefixNoRegex, "/static/", "http://static"),
                loc(RegexCaseless, r"\.(png|jpg)$", "http://static"),
                LocationConfig {
                    rewrites: vec![
                        rw("^/old/moved/(.*)$", "/elsewhere/$1", RewriteFlag::Permanent),
                        rw("^/old/(.*)$", "/new/$1", RewriteFlag::Last),
                    ],
                    ..loc(Prefix, "/old/", "http://app")
                },
                LocationConfig {
                    return_: ret(200, "hello $host $1\n"),
                    ..loc(Regex, "^/hello/(\\w+)$", "")
                },
            ],
            ..Default::default()
        },
        VhostConfig {
            listen: vec!["0.0.0.0:80".into()],
            names: vec!["~^www\\d+\\.other\\.org$".into(), "mail.*".into()],
            default_server: true,
            return_: ret(301, "https://$host$request_uri"),
            ..Default::default()
        },
        VhostConfig {
            listen: vec!["0.0.0.0:81".into()],
            names: vec![".example.com".into()],
            rewrites: vec![rw("^/x$", "/y", RewriteFlag::None)],
            locations: vec![loc(Prefix, "/y", "http://api"), loc(Prefix, "/", "http://app")],
            ..Default::default()
        },
    ];
    c
}

fn route(r: &Router, port: u16, host: &str, target: &str) -> Route {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    r.route(&RouteRequest {
        listen: format!("0.0.0.0:{port}").parse().unwrap(),
        port,
        tls: false,
        host,
        path,
        query,
    })
}

fn proxy(upstream: usize, uri: Option<&str>) -> Route {
    Route::Proxy {
        upstream,
        uri: uri.map(str::to_string),
        grpc: false,
    }
}

fn location_of(r: Route) -> (u16, Option<String>) {
    match r {
        Route::Respond { status, location, .. } => (status, location),
        p => panic!("not a response: {p:?}"),
    }
}

#[test]
fn locations_in_nginx_order() {
    let r = Router::build(&config()).unwrap();
    assert!(!r.is_trivial());
    let h = "example.com";
    assert_eq!(route(&r, 80, h, "/"), proxy(0, None));
    assert_eq!(route(&r, 80, h, "/anything?x=1"), proxy(0, None));
    // The URI part replaces the prefix; arguments follow.
    assert_eq!(
        route(&r, 80, h, "/api/users?x=1"),
        proxy(1, Some("/v2/users?x=1"))
    );
    assert_eq!(route(&r, 80, h, "/exact"), proxy(2, None));
    assert_eq!(route(&r, 80, h, "/exact/more"), proxy(0, None));
    // A regex beats a plain prefix, but not `^~`.
    assert_eq!(route(&r, 80, h, "/img/A.PNG"), proxy(2, None));
    assert_eq!(route(&r, 80, h, "/api/logo.png"), proxy(2, None));
    assert_eq!(route(&r, 80, h, "/static/a.png"), proxy(2, None));
    // A proxied prefix without its slash redirects to it.
    assert_eq!(
        location_of(route(&r, 80, h, "/api?q=1")),
        (301, Some("http://example.com/api/?q=1".into()))
    );
    // Matching is on the normalized URI; the URI part gets the normalized rest, escaped.
    assert_eq!(
        route(&r, 80, h, "/static/../api/a%20b"),
        proxy(1, Some("/v2/a%20b"))
    );
    assert_eq!(location_of(route(&r, 80, h, "/../x")).0, 400);
    match route(&r, 80, "www.example.com", "/hello/bob") {
        Route::Respond { status, body, .. } => {
            assert_eq!((status, body.as_str()), (200, "hello www.example.com bob\n"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rewrites_last_break_and_redirects() {
    let r = Router::build(&config()).unwrap();
    let h = "example.com";
    // `last` chooses the location again: /new/ is under `/`.
    assert_eq!(route(&r, 80, h, "/old/a?k=v"), proxy(0, Some("/new/a?k=v")));
    assert_eq!(
        location_of(route(&r, 80, h, "/old/moved/z?k=v")),
        (301, Some("http://example.com/elsewhere/z?k=v".into()))
    );
    // Server-level rewrite without a flag, then the location is chosen with the new URI.
    assert_eq!(route(&r, 81, "a.example.com", "/x"), proxy(1, Some("/y")));
    assert_eq!(route(&r, 81, "a.example.com", "/z"), proxy(0, None));
    assert_eq!(route(&r, 81, "example.com:81", "/api"), proxy(0, None));
}

#[test]
fn break_keeps_the_location() {
    let mut c = config();
    c.vhosts[0].locations.push(LocationConfig {
        rewrites: vec![rw("^/b/(.*)$", "/api/$1?from=b", RewriteFlag::Break)],
        ..loc(LocationMatch::Prefix, "/b/", "http://static/ignored/")
    });
    let r = Router::build(&c).unwrap();
    assert_eq!(
        route(&r, 80, "example.com", "/b/c?d=1"),
        proxy(2, Some("/api/c?from=b&d=1"))
    );
}

#[test]
fn server_names_like_nginx() {
    let r = Router::build(&config()).unwrap();
    assert_eq!(route(&r, 80, "EXAMPLE.com.", "/"), proxy(0, None));
    assert_eq!(route(&r, 80, "deep.sub.example.com:80", "/"), proxy(0, None));
    for host in ["www12.other.org", "mail.anything", "unknown.net", ""] {
        assert_eq!(
            location_of(route(&r, 80, host, "/p?q")),
            (301, Some(format!("https://{}/p?q", host_name(host)))),
            "{host}"
        );
    }
    // `.example.com` matches the bare name too.
    assert_eq!(route(&r, 81, "example.com", "/x"), proxy(1, Some("/y")));
}

#[test]
fn bad_tables_name_their_key() {
    let mut c = config();
    c.vhosts[0].locations[1].proxy_pass = "http://nope/".into();
    let e = Router::build(&c).unwrap_err();
    assert_eq!(e.key, "vhosts[0].locations[1].proxy_pass");
    let mut c = config();
    c.vhosts[0].locations[4].proxy_pass = "http://static/x/".into();
    assert!(Router::build(&c).unwrap_err().message.contains("URI part"));
    let mut c = config();
    c.vhosts[0].locations[5].rewrites[0].regex = "(".into();
    assert_eq!(
        Router::build(&c).unwrap_err().key,
        "vhosts[0].locations[5].rewrites[0].regex"
    );
    let mut c = config();
    c.vhosts[1].return_ = ret(301, "https://$nope");
    assert!(Router::build(&c).unwrap_err().message.contains("$nope"));
}

#[test]
fn a_single_root_location_is_trivial() {
    let mut c = config();
    c.vhosts = vec![VhostConfig {
        locations: vec![loc(LocationMatch::Prefix, "/", "http://app")],
        ..Default::default()
    }];
    assert!(Router::build(&c).unwrap().is_trivial());
    c.vhosts.clear();
    assert!(Router::build(&c).unwrap().is_trivial());
}

#[test]
fn normalization() {
    assert_eq!(normalize("/a/b").unwrap(), "/a/b");
    assert_eq!(normalize("/a//b/./c/../d").unwrap(), "/a/b/d");
    assert_eq!(normalize("/a/..").unwrap(), "/");
    assert_eq!(normalize("/a/.").unwrap(), "/a/");
    assert_eq!(normalize("/%41%2Fb").unwrap(), "/A/b");
    assert!(normalize("/%zz").is_none());
    assert!(normalize("/%00").is_none());
    assert!(normalize("/..").is_none());
    let mut s = String::new();
    escape_into("/a b%?#é", &mut s);
    assert_eq!(s, "/a%20b%25%3F%23%C3%A9");
}

#[test]
fn files_by_root_alias_and_try_files() {
    let mut c = config();
    c.vhosts[0].root = "/srv/www".into();
    c.vhosts[0].locations.push(LocationConfig {
        alias: "/srv/assets/".into(),
        ..loc(LocationMatch::PrefixNoRegex, "/assets/", "")
    });
    c.vhosts[0].locations.push(LocationConfig {
        try_files: vec!["$uri".into(), "$uri/".into(), "/index.html".into()],
        ..loc(LocationMatch::Prefix, "/app/", "")
    });
    let r = Router::build(&c).unwrap();
    let files = |target: &str| match route(&r, 80, "example.com", target) {
        Route::Files {
            candidates,
            fallback,
            redirect_dirs,
            slash_location,
        } => (candidates, fallback, redirect_dirs, slash_location),
        other => panic!("{target}: {other:?}"),
    };
    let (c1, f1, d1, s1) = files("/assets/a%20b.css?v=1");
    assert_eq!(c1, ["/srv/assets/a b.css"]);
    assert_eq!((f1, d1), (Fallback::Status(404), true));
    assert_eq!(s1, "http://example.com/assets/a%20b.css/?v=1");
    let (c2, f2, d2, _) = files("/app/x");
    assert_eq!(c2, ["/srv/www/app/x", "/srv/www/app/x/"]);
    assert_eq!((f2, d2), (Fallback::File("/srv/www/index.html".into()), false));
}
