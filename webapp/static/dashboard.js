// ha-stack dashboard: draws lb, the webapps, dbproxy and the database nodes from the snapshots the
// webapp pushes over Server-Sent Events. Everything read from a snapshot is treated as untrusted and
// possibly incomplete: missing or odd fields fall back to "unknown", text is set with textContent.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var svg = document.getElementById("topo");
  var details = document.getElementById("details");
  var eventsList = document.getElementById("events");
  var conn = document.getElementById("conn");
  // The operator session's CSRF token, present only on a logged-in operator's page.
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : null;
  // Key of the clicked node; a link like /dashboard#db:1 opens with that node selected.
  var selected = location.hash.length > 1 ? decodeURIComponent(location.hash.slice(1)) : null;
  var current = null;

  function arr(x) { return Array.isArray(x) ? x : []; }
  function obj(x) { return x && typeof x === "object" && !Array.isArray(x) ? x : {}; }
  function str(x) {
    if (x === null || x === undefined) return "";
    if (typeof x === "object") { try { return JSON.stringify(x); } catch (e) { return "?"; } }
    return String(x);
  }
  function lower(x) { return str(x).toLowerCase(); }

  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, value, cls) {
    var t = el("text", { x: x, y: y, "text-anchor": "middle" }, parent);
    if (cls) t.setAttribute("class", cls);
    t.textContent = value.length > 28 ? value.slice(0, 27) + "…" : value;
    return t;
  }

  // What the page knows of each source: null when not configured.
  function source(snap, name) {
    var s = snap[name];
    if (!s || typeof s !== "object") return null;
    return { reachable: s.reachable === true, error: str(s.error), url: str(s.url), status: obj(s.status) };
  }

  function dbRole(n) {
    var r = lower(n.role || n.pg_role);
    if (r.indexOf("primary") >= 0 || r.indexOf("master") >= 0) return "primary";
    if (r.indexOf("standby") >= 0 || r.indexOf("replica") >= 0) return "standby";
    return "unknown";
  }
  function dbState(n) {
    var s = lower(n.status || n.pg_status);
    if (s === "down" || s === "quarantine" || s === "fenced" || s === "unused") return "down";
    if (s === "up" || s === "waiting") return "up";
    return "unknown";
  }
  function dbId(n, i) { var id = str(n.node_id !== undefined ? n.node_id : n.id); return id === "" ? String(i) : id; }
  function serverState(s) {
    if (s.healthy === false || s.available === false || s.down === true) return "down";
    if (s.healthy === true) return "up";
    return "unknown";
  }

  // The dbproxy instances of a pair (snap.dbproxies), each with its part and its view of etcd.
  function instances(snap) {
    return arr(snap.dbproxies).map(function (p0) {
      var p = obj(p0);
      return { url: str(p.url), reachable: p.reachable === true, error: p.error, instance: p.instance, leader: p.leader,
        is_leader: p.is_leader, etcd_reachable: p.etcd_reachable, etcd_since: p.etcd_since, etcd_error: p.etcd_error,
        mode: p.mode, lease_ttl_s: p.lease_ttl_s, primary: p.primary };
    });
  }

  // The proxy tier's title: with a pair, who leads and how many instances reach etcd.
  function proxyTitle(snap) {
    var pair = instances(snap);
    if (pair.length <= 1) return TIER_NAME[2];
    var leader = "";
    pair.forEach(function (p) { if (p.reachable && str(p.leader) && !leader) leader = str(p.leader); });
    var reach = pair.filter(function (p) { return p.reachable && p.etcd_reachable === true; }).length;
    return TIER_NAME[2] + " · leader " + (leader || "none") + " · etcd reached by " + reach + " of " + pair.length;
  }

  // Builds the list of drawable nodes from a snapshot.
  function model(snap) {
    var nodes = [];
    var lb = source(snap, "lb");
    var dp = source(snap, "dbproxy");
    if (lb) {
      var st = lb.status;
      nodes.push({ key: "lb", tier: 0, label: "lb", sub: lb.reachable ? str(st.upstream || "") + " " + str(st.algorithm || "") : "unreachable",
        cls: lb.reachable ? "up" : "unknown", info: lb.reachable ? st : { url: lb.url, error: lb.error } });
      arr(st.servers).forEach(function (s0, i) {
        var s = obj(s0);
        var name = str(s.name || s.addr || ("server " + i));
        nodes.push({ key: "web:" + str(s.addr || name), tier: 1, label: name, sub: serverState(s) === "down" ? "down" : "requests " + str(s.requests === undefined ? "?" : s.requests),
          cls: serverState(s), info: s });
      });
    }
    if (!lb || arr(lb.status.servers).length === 0) {
      nodes.push({ key: "web:self", tier: 1, label: str(snap.instance || "webapp"), sub: "this instance", cls: "up", info: { instance: snap.instance } });
    }
    var pair = instances(snap);
    if (pair.length > 1) {
      // Several dbproxy instances coordinated through etcd: one box each, the leader marked.
      pair.forEach(function (p, i) {
        var name = str(p.instance) || ("dbproxy " + (i + 1));
        var sub = !p.reachable ? "unreachable"
          : (p.is_leader === true ? "leader" : "follower") + " · " + (p.etcd_reachable === false ? "etcd unreachable" : "etcd ok");
        var cls = !p.reachable ? "down" : "up" + (p.is_leader === true ? " leader" : "") + (p.etcd_reachable === false ? " etcd-lost" : "");
        nodes.push({ key: "dbproxy:" + name, tier: 2, label: name, sub: sub, cls: cls, info: p });
      });
    }
    if (dp) {
      var ds = dp.status;
      if (pair.length <= 1) {
        nodes.push({ key: "dbproxy", tier: 2, label: "dbproxy", sub: dp.reachable ? "primary: " + str(ds.primary === undefined ? "?" : ds.primary) : "unreachable",
          cls: dp.reachable ? "up" : "unknown", info: dp.reachable ? ds : { url: dp.url, error: dp.error } });
      }
      arr(ds.nodes).forEach(function (n0, i) {
        var n = obj(n0);
        var id = dbId(n, i);
        var state = dbState(n);
        var role = dbRole(n);
        var where = str(n.hostname || n.host || "") + (n.port !== undefined ? ":" + str(n.port) : "");
        var lag = n.replication_delay !== undefined ? " lag " + str(n.replication_delay) : "";
        nodes.push({ key: "db:" + id, id: id, tier: 3, label: "node " + id + " " + role, sub: state === "down" ? "down" : where + lag,
          cls: state === "down" ? "down" : role, role: role, state: state, info: n });
      });
    }
    return nodes;
  }

  var TIER_Y = [80, 210, 350, 480];
  var TIER_NAME = ["load balancer", "webapps", "database proxy", "database nodes"];
  var BOX_W = 190, BOX_H = 58;

  function draw(snap) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var nodes = model(snap);
    var byTier = [[], [], [], []];
    nodes.forEach(function (n) { byTier[n.tier].push(n); });
    byTier.forEach(function (list, t) {
      var gap = 900 / (list.length + 1);
      list.forEach(function (n, i) { n.x = gap * (i + 1); n.y = TIER_Y[t]; });
    });
    var edges = el("g", {}, svg);
    function link(a, b, down) {
      el("line", { x1: a.x, y1: a.y + BOX_H / 2, x2: b.x, y2: b.y - BOX_H / 2, "class": down ? "edge down" : "edge" }, edges);
    }
    byTier[1].forEach(function (w) {
      byTier[0].forEach(function (l) { link(l, w, w.cls === "down"); });
      byTier[2].forEach(function (d) { link(w, d, d.cls.split(" ")[0] !== "up"); });
    });
    byTier[3].forEach(function (n) { byTier[2].forEach(function (d) { link(d, n, n.cls === "down"); }); });
    byTier.forEach(function (list, t) {
      if (list.length) {
        var tt = el("text", { x: 8, y: TIER_Y[t] - BOX_H / 2 - 8, "class": "title" }, svg);
        if (t === 2) tt.setAttribute("id", "proxy-tier");
        tt.textContent = t === 2 ? proxyTitle(snap) : TIER_NAME[t];
      }
    });
    nodes.forEach(function (n) {
      var g = el("g", { "class": "node " + n.cls + (n.key === selected ? " selected" : ""), "data-key": n.key, transform: "translate(" + n.x + "," + n.y + ")" }, svg);
      el("rect", { x: -BOX_W / 2, y: -BOX_H / 2, width: BOX_W, height: BOX_H, rx: 8 }, g);
      text(g, 0, -5, n.label, "label");
      text(g, 0, 15, n.sub.trim() || "-");
      g.addEventListener("click", function () {
        selected = n.key;
        if (history.replaceState) history.replaceState(null, "", "#" + encodeURIComponent(n.key));
        draw(current);
      });
    });
    if (selected) {
      var still = nodes.filter(function (n) { return n.key === selected; })[0];
      if (still) showDetails(still, snap);
    }
  }

  function showDetails(n, snap) {
    while (details.firstChild) details.removeChild(details.firstChild);
    var h = document.createElement("h2");
    h.textContent = n.label;
    details.appendChild(h);
    var dl = document.createElement("dl");
    var info = obj(n.info);
    Object.keys(info).forEach(function (k) {
      var dt = document.createElement("dt"); dt.textContent = k;
      var dd = document.createElement("dd"); dd.textContent = str(info[k]);
      dl.appendChild(dt); dl.appendChild(dd);
    });
    details.appendChild(dl);
    if (snap.switchover === true && n.tier === 3 && n.role === "standby" && n.state !== "down") {
      if (csrf) {
        var b = document.createElement("button");
        b.id = "switchover";
        b.textContent = "switch over to node " + n.id;
        b.addEventListener("click", function () { switchover(n.id, b); });
        details.appendChild(b);
      } else {
        var a = document.createElement("a");
        a.id = "login-to-switch";
        a.href = "/dashboard/login";
        a.textContent = "log in as operator to switch over";
        details.appendChild(a);
      }
    }
  }

  function switchover(id, button) {
    button.disabled = true;
    addEvent("switchover to node " + id + " requested");
    fetch("/dashboard/switchover/" + encodeURIComponent(id), { method: "POST", credentials: "same-origin", headers: { "x-csrf-token": csrf } })
      .then(function (r) { return r.json().then(function (j) { return [r.status, j]; }); })
      .then(function (x) { addEvent("switchover to node " + id + ": " + (x[0] === 200 ? "accepted" : "failed: " + str(x[1].error || x[1].answer))); })
      .catch(function (e) { addEvent("switchover to node " + id + " failed: " + e); })
      .then(function () { button.disabled = false; });
  }

  // Events: the webapp's own record of changes (snap.events, the same for every viewer), dbproxy's
  // own history of failovers, switchovers and re-attachments, and this page's own actions.
  var localEvents = [];
  function addEvent(what) {
    localEvents.push({ at: Date.now(), message: what });
    if (localEvents.length > 50) localEvents.shift();
    renderEvents(current || {});
  }

  function renderEvents(snap) {
    var all = [];
    arr(snap.events).forEach(function (e0) {
      var e = obj(e0);
      all.push({ at: typeof e.at === "number" ? e.at : 0, message: str(e.message) });
    });
    var dp = source(snap, "dbproxy");
    if (dp) {
      // dbproxy's /status `history`: failovers, switchovers and re-attachments.
      arr(dp.status.history).forEach(function (e0) {
        var e = obj(e0);
        var when = obj(e.resumed || e.finished || e.detected || e.started);
        var at = typeof when.ms === "number" ? when.ms : 0;
        var what = str(e.kind);
        if (e.kind === "attach") {
          what += " " + str(e.node);
        } else {
          what += " " + str(e.failed) + " → " + (e.promoted ? str(e.promoted) : "nobody");
        }
        if (e.error) what += " (failed: " + str(e.error) + ")";
        all.push({ at: at, message: "dbproxy: " + what });
      });
    }
    all = all.concat(localEvents);
    all.sort(function (a, b) { return b.at - a.at; });
    while (eventsList.firstChild) eventsList.removeChild(eventsList.firstChild);
    all.slice(0, 100).forEach(function (e) {
      var li = document.createElement("li");
      var t = document.createElement("time");
      t.textContent = e.at ? new Date(e.at).toISOString().slice(11, 19) : "--:--:--";
      li.appendChild(t);
      li.appendChild(document.createTextNode(e.message));
      eventsList.appendChild(li);
    });
  }

  function apply(snap) {
    snap = obj(snap);
    current = snap;
    draw(snap);
    renderEvents(snap);
  }

  try {
    var first = JSON.parse(document.getElementById("snapshot").textContent || "{}");
    apply(first);
  } catch (e) {
    addEvent("cannot read the first snapshot: " + e);
  }

  if (window.EventSource) {
    var es = new EventSource("/dashboard/events");
    es.addEventListener("snapshot", function (m) {
      conn.textContent = "live";
      conn.className = "conn live";
      try { apply(JSON.parse(m.data)); } catch (e) { addEvent("bad snapshot: " + e); }
    });
    es.onerror = function () { conn.textContent = "connection lost, retrying…"; conn.className = "conn lost"; };
  } else {
    conn.textContent = "this browser has no EventSource: reload to update";
  }
})();
