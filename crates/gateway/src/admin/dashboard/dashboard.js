"use strict";
// The bulwark dashboard: reads the admin API once a second and renders it. Read-only; every
// value is written with textContent (names come from the config, but are never parsed as HTML).

const POLL_MS = 1000;
let previous = null; // { time, routes: { name: { total, errors } } }

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function row(cells, attrs) {
  const tr = el("tr", null, attrs);
  for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
  return tr;
}

function cell(children, cls) {
  const td = el("td", null, cls ? { class: cls } : {});
  td.append(...children);
  return td;
}

// The Prometheus text format, reduced to what the page shows.
function parseMetrics(text) {
  // No prototype: a route named `constructor` or `__proto__` is a key like any other.
  const routes = Object.create(null);
  const gauges = Object.create(null);
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const [, name, labelText, value] = m;
    const labels = Object.create(null);
    for (const p of (labelText || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[p[1]] = p[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    const v = Number(value);
    if (name === "bulwark_requests_total") {
      const r = (routes[labels.route] ??= { upstream: labels.upstream, total: 0, errors: 0 });
      r.total += v;
      if (Number(labels.code) >= 500) r.errors += v;
    } else if (!labelText) {
      gauges[name] = v;
    }
  }
  return { routes, gauges };
}

function renderUpstreams(health, breakers) {
  const body = document.querySelector("#upstreams tbody");
  const rows = [];
  for (const [name, up] of Object.entries(health.upstreams || {})) {
    const all = breakers.upstreams || {};
    const b = (Object.hasOwn(all, name) && all[name]) || {};
    const breaker = b.state || up.circuit_breaker;
    const eps = (up.endpoints || []).map((ep) => {
      const ok = ep.healthy && !ep.ejected && !ep.cooling_down;
      const what = ep.ejected ? "ejected" : !ep.healthy ? "unhealthy"
        : ep.cooling_down ? "cooling down" : "healthy";
      return el("span", `${ep.url} ${what}`, { class: `badge ${ok ? "ok" : "down"}` });
    });
    const state = [el("span", breaker, { class: "badge", "data-state": breaker })];
    if (b.override) state.push(el("span", `override: ${b.override}`, { class: "badge" }));
    if (up.panic) state.push(el("span", "panic mode", { class: "badge down" }));
    rows.push(row([
      name,
      cell([el("span", up.status, { class: "badge", "data-status": up.status })]),
      cell(state),
      cell(eps),
    ], { "data-upstream": name, "data-breaker": breaker, "data-status": up.status }));
  }
  body.replaceChildren(...rows);
}

function renderRoutes(metrics, now) {
  const body = document.querySelector("#routes tbody");
  const rows = [];
  for (const [name, r] of Object.entries(metrics.routes).sort()) {
    let rate = "–";
    let share = r.total ? `${((100 * r.errors) / r.total).toFixed(1)} %` : "–";
    const before = previous && previous.routes[name];
    if (before) {
      const secs = (now - previous.time) / 1000;
      const n = r.total - before.total;
      // A counter that went down: the gateway restarted; wait for the next reading.
      rate = secs > 0 && n >= 0 ? (n / secs).toFixed(1) : "–";
      share = n > 0 ? `${((100 * (r.errors - before.errors)) / n).toFixed(1)} %` : "–";
    }
    rows.push(row([
      name,
      r.upstream,
      el("td", r.total, { class: "num" }),
      el("td", r.errors, { class: "num" }),
      el("td", rate, { class: "num" }),
      el("td", share, { class: "num" }),
    ], { "data-route": name, "data-requests": r.total }));
  }
  body.replaceChildren(...rows);
}

function renderGateway(health, metrics) {
  const g = metrics.gauges;
  const items = [
    ["config generation", health.config_generation],
    ["unavailable routes", (health.unavailable_routes || []).join(", ") || "none"],
    ["admission: running", g.bulwark_admission_running ?? 0],
    ["admission: queued", g.bulwark_admission_queued ?? 0],
    ["WebSocket tunnels", g.bulwark_websocket_tunnels ?? 0],
  ];
  document.getElementById("gateway").replaceChildren(
    ...items.flatMap(([k, v]) => [el("dt", k), el("dd", v)]),
  );
}

async function fetchOk(path, as) {
  const r = await fetch(path, { cache: "no-store" });
  // /health answers 503 with its JSON when the gateway is unhealthy.
  if (!r.ok && !(path === "/health" && r.status === 503)) throw new Error(`${path}: ${r.status}`);
  return as === "json" ? r.json() : r.text();
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [health, breakers, mode, text] = await Promise.all([
      fetchOk("/health", "json"),
      fetchOk("/api/circuit-breakers", "json"),
      fetchOk("/api/mode", "json"),
      fetchOk("/metrics", "text"),
    ]);
    const now = Date.now();
    const metrics = parseMetrics(text);
    const status = document.getElementById("status");
    status.textContent = health.status;
    status.dataset.status = health.status;
    const m = document.getElementById("mode");
    m.textContent = mode.override ? `mode: ${mode.mode} (override)` : `mode: ${mode.mode}`;
    m.dataset.mode = mode.mode;
    renderUpstreams(health, breakers);
    renderRoutes(metrics, now);
    renderGateway(health, metrics);
    document.getElementById("meta").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
    previous = { time: now, routes: metrics.routes };
    error.hidden = true;
    document.body.dataset.loaded = "true";
  } catch (e) {
    error.textContent = `Cannot read the admin API: ${e.message}`;
    error.hidden = false;
  }
  setTimeout(refresh, POLL_MS);
}

refresh();
