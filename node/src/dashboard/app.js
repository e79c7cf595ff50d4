// omesh dashboard. Polls this peer's JSON API about once a second and draws the whole mesh.
//
// Everything the mesh says (commands, tags, errors, logs) is hostile input: it reaches the
// page only as text (textContent, append of strings, setAttribute of plain values), never as
// markup. The page's Content-Security-Policy allows no inline script either.
'use strict';

const POLL_MS = 1000;
const HISTORY = 60; // load samples kept per node (about a minute)
const LOG_KEEP = 256 * 1024; // characters of log kept in the page
const MAX_TASK_ROWS = 500; // task rows drawn on the mesh view
const TOKEN_KEY = 'omesh.token';
const CODES = { pending: 100, running: 200, succeeded: 300, failed: 400, cancelled: 499 };

const S = {
  status: null,
  peers: [],
  tasks: [],
  load: new Map(), // node id -> [{cpu, mem}]
  error: null,
  route: { view: 'mesh', task: null },
  log: null, // { task, epoch, offset, done, busy, error }
};

// ---- small helpers -------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

// An element with attributes and children; strings become text nodes, never markup.
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else el.setAttribute(k, String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

const short = (hex) => (typeof hex === 'string' ? hex.slice(0, 10) : '');

function ago(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return `${ms} ms ago`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s ago`;
  if (ms < 7200000) return `${Math.round(ms / 60000)} min ago`;
  return `${(ms / 3600000).toFixed(1)} h ago`;
}

function duration(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function localTime(ms) {
  const d = new Date(ms);
  return Number.isFinite(d.getTime()) ? d.toLocaleString() : String(ms);
}

// Health as the page words it: the API's `gone` is a peer the mesh has given up on.
const healthWord = (h) => (h === 'gone' ? 'dead' : h);

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch (_) {
    return '';
  }
}

function setToken(t) {
  try {
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (_) {
    /* storage disabled: the token lives only in the form */
  }
  renderToken();
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ cache: 'no-store' }, opts || {}));
  let body = null;
  try {
    body = await r.json();
  } catch (_) {
    body = null;
  }
  if (!r.ok) {
    const reason = body && typeof body.error === 'string' ? body.error : `${r.status} ${r.statusText}`;
    const e = new Error(reason);
    e.status = r.status;
    throw e;
  }
  return body;
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

// ---- polling -------------------------------------------------------------------------------

async function poll() {
  try {
    const [status, peers, tasks] = await Promise.all([
      api('/api/v1/status'),
      api('/api/v1/peers'),
      api('/api/v1/tasks'),
    ]);
    S.status = status;
    S.peers = Array.isArray(peers) ? peers : [];
    S.tasks = Array.isArray(tasks) ? tasks : [];
    S.error = null;
    for (const p of S.peers) {
      const hist = S.load.get(p.id) || [];
      hist.push({ cpu: Number(p.cpu_percent) || 0, mem: Number(p.mem_percent) || 0 });
      while (hist.length > HISTORY) hist.shift();
      S.load.set(p.id, hist);
    }
  } catch (e) {
    S.error = `this peer does not answer: ${e.message}`;
  }
  render();
  setTimeout(poll, POLL_MS);
}

// ---- rendering -----------------------------------------------------------------------------

function render() {
  const conn = $('conn');
  conn.hidden = !S.error;
  conn.textContent = S.error || '';
  renderSelf();
  if (S.route.view === 'task') renderTask();
  else renderMesh();
}

function renderSelf() {
  const st = S.status;
  if (!st) return;
  $('self').textContent =
    `${short(st.node_id)} · v${st.version} · incarnation ${st.incarnation} · up ${duration(st.uptime_ms)}` +
    ` · ${st.ready ? 'ready' : 'not ready'} · admission ${st.admission || '?'}`;
}

function card(label, big, detail, attrs) {
  return h('div', Object.assign({ class: 'card' }, attrs || {}),
    h('div', { class: 'label' }, label),
    h('div', { class: 'big' }, big),
    detail ? h('div', { class: 'muted' }, detail) : null);
}

function renderMesh() {
  const counts = { alive: 0, suspect: 0, dead: 0 };
  for (const p of S.peers) counts[healthWord(p.health)] = (counts[healthWord(p.health)] || 0) + 1;
  const others = S.peers.filter((p) => !p.is_self && p.health !== 'gone');
  const compared = others.filter((p) => p.digest_agrees !== null && p.digest_agrees !== undefined);
  const agreeing = compared.filter((p) => p.digest_agrees).length;
  let agreement;
  if (others.length === 0) agreement = 'alone';
  else if (compared.length === 0) agreement = 'not compared yet';
  else if (agreeing === compared.length) agreement = 'agree';
  else agreement = 'differ';
  const byState = {};
  for (const t of S.tasks) byState[t.state] = (byState[t.state] || 0) + 1;
  const taskLine = Object.entries(byState).map(([k, v]) => `${v} ${k}`).join(' · ') || 'none';

  $('summary').replaceChildren(
    card('mesh health', `${counts.alive} alive · ${counts.suspect} suspect · ${counts.dead} dead`,
      `${S.peers.length} nodes known`, { id: 'health-summary', 'data-alive': counts.alive,
        'data-suspect': counts.suspect, 'data-dead': counts.dead }),
    card('state digest', agreement,
      compared.length ? `${agreeing} of ${compared.length} live peers equal at last exchange` :
        (S.status ? `this node: ${S.status.digest.slice(0, 16)}…` : ''),
      { id: 'digest-summary', 'data-agreement': agreement }),
    card('tasks', String(S.tasks.length), taskLine, { id: 'task-summary' }),
  );

  $('nodes-count').textContent = `(${S.peers.length})`;
  const peers = S.peers.slice().sort((a, b) => (b.is_self - a.is_self) || a.id.localeCompare(b.id));
  replaceRows($('nodes').tBodies[0], peers.map(nodeRow));

  // Unfinished tasks first; past MAX_TASK_ROWS the page would get slow on a weak box.
  const tasks = S.tasks.slice().sort((a, b) => (a.code - b.code) || a.id.localeCompare(b.id));
  const shown = tasks.slice(0, MAX_TASK_ROWS);
  $('tasks-count').textContent = shown.length < tasks.length ?
    `(${tasks.length}; the first ${shown.length} shown, unfinished first)` : `(${tasks.length})`;
  replaceRows($('tasks').tBodies[0], shown.map(taskRow));
}

function sparkline(values, cls) {
  const w = 60;
  const hgt = 16;
  const s = svg('svg', { class: 'spark', width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}` });
  s.append(svg('rect', { width: w, height: hgt }));
  if (values.length > 1) {
    const step = w / (HISTORY - 1);
    const x0 = w - step * (values.length - 1);
    const pts = values.map((v, i) =>
      `${(x0 + i * step).toFixed(1)},${(hgt - 1 - (Math.min(100, Math.max(0, v)) / 100) * (hgt - 2)).toFixed(1)}`);
    s.append(svg('polyline', { points: pts.join(' '), class: cls }));
  }
  return s;
}

function nodeRow(p) {
  const word = healthWord(p.health);
  const hist = S.load.get(p.id) || [];
  const images = Array.isArray(p.images) ? p.images : [];
  let digest = '—';
  if (p.is_self) digest = 'this node';
  else if (p.digest_agrees === true) digest = `agrees (${ago(p.digest_compared_ms_ago)})`;
  else if (p.digest_agrees === false) digest = `differs (${ago(p.digest_compared_ms_ago)})`;
  return h('tr', { class: p.is_self ? 'node is-self' : 'node', 'data-id': p.id, 'data-health': word },
    h('td', {}, h('span', { class: `badge h-${word}`, title: `API health: ${p.health}` }, word)),
    h('td', { title: `node ${p.id}\npeer ${p.peer_id}\n${(p.addresses || []).join('\n')}` },
      h('code', {}, short(p.id)), p.is_self ? h('span', { class: 'muted' }, ' · this node') : null),
    h('td', { class: 'wrap' }, (p.tags || []).map((t) => h('span', { class: 'tag' }, t))),
    h('td', {}, `${Number(p.cpu_percent).toFixed(1)}%`, sparkline(hist.map((x) => x.cpu), 'cpu')),
    h('td', {}, `${Number(p.mem_percent).toFixed(1)}%`, sparkline(hist.map((x) => x.mem), 'mem')),
    h('td', {}, p.rtt_ms === null || p.rtt_ms === undefined ? '—' : `${Number(p.rtt_ms).toFixed(1)} ms`),
    h('td', {}, String(p.incarnation)),
    h('td', {}, p.is_self ? '—' : ago(p.last_heard_ms_ago),
      p.suspected_ms_ago !== null && p.suspected_ms_ago !== undefined ?
        h('div', { class: 'muted' }, `suspected ${ago(p.suspected_ms_ago)}`) : null),
    h('td', { title: images.join('\n') }, images.length ? `${images.length} blobs` : 'none'),
    h('td', {}, digest),
  );
}

function stateBadge(state, code) {
  return h('span', { class: `badge s-${code}`, title: `state code ${code}` }, `${state} (${code})`);
}

function waitingFor(t) {
  if (t.progress) return t.progress;
  if (t.code === 100 && t.pending_reason) return t.pending_reason;
  if (t.code === 100 && t.owner) return `starting on ${short(t.owner)}`;
  if (t.code === 100) return 'a node to claim it';
  return '';
}

function ownerText(owner) {
  if (!owner) return '—';
  const p = S.peers.find((x) => x.id === owner);
  const suffix = p ? (p.is_self ? ' (this node)' : ` (${healthWord(p.health)})`) : '';
  return `${short(owner)}${suffix}`;
}

function taskRow(t) {
  const dots = h('span', { class: 'dots' },
    (t.history || []).map((e) => {
      const code = CODES[e.state] || 0;
      return h('span', { class: `s-${code}`, title: `epoch ${e.epoch}: ${e.state}` });
    }));
  return h('tr', { class: 'task', 'data-id': t.id, 'data-state': t.state, 'data-code': t.code },
    h('td', {}, h('a', { href: `#/task/${encodeURIComponent(t.id)}` }, h('code', {}, short(t.id)))),
    h('td', { class: 'wrap' }, h('code', {}, (t.command || []).join(' '))),
    h('td', {}, stateBadge(t.state, t.code)),
    h('td', {}, ownerText(t.owner)),
    h('td', {}, `epoch ${t.epoch} `, dots),
    h('td', { class: 'wrap' }, waitingFor(t)),
  );
}

function info(dl, rows) {
  dl.replaceChildren(...rows.filter((r) => r[1] !== null && r[1] !== undefined && r[1] !== '')
    .flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function renderTask() {
  const id = S.route.task;
  $('task-id').textContent = id;
  const t = S.tasks.find((x) => x.id === id);
  if (!t) {
    info($('task-info'), [['state', 'not known to this node (yet)']]);
    $('timeline').replaceChildren();
    return;
  }
  const d = t.disconnect || {};
  info($('task-info'), [
    ['state', stateBadge(t.state, t.code)],
    ['waiting for', waitingFor(t)],
    ['owner', ownerText(t.owner)],
    ['epoch', String(t.epoch)],
    ['command', h('code', {}, (t.command || []).join(' '))],
    ['image', t.image],
    ['failed attempts', String(t.failed_attempts)],
    ['exit code', t.exit_code === null || t.exit_code === undefined ? null : String(t.exit_code)],
    ['error', t.error],
    ['disconnect', d.policy ? `${d.policy}${d.stop_after_ms ? ` · stop after ${d.stop_after_ms} ms` : ''}` +
      `${d.lost_after_ms ? ` · lost after ${d.lost_after_ms} ms` : ''}` : null],
    ['compacted', t.compacted ? 'yes: only a tombstone remains' : null],
  ]);
  const hist = t.history || [];
  const first = hist.length ? Math.min(...hist.map((e) => e.at_ms)) : 0;
  $('timeline').replaceChildren(...hist.map((e) => {
    const code = CODES[e.state] || 0;
    const offset = e.at_ms - first;
    return h('li', { class: `e-${code}`, 'data-epoch': e.epoch, 'data-state': e.state },
      h('strong', {}, `epoch ${e.epoch}: ${e.state} (${code})`),
      ` on ${ownerText(e.reporter)} · ${localTime(e.at_ms)}`,
      h('span', { class: 'muted' }, ` (+${(offset / 1000).toFixed(1)} s)`),
      e.exit_code !== null && e.exit_code !== undefined ? ` · exit ${e.exit_code}` : null,
      e.epoch < t.epoch && code < 300 ? h('span', { class: 'muted' }, ` · superseded by epoch ${t.epoch}`) : null,
      e.error ? h('div', { class: 'muted' }, e.error) : null);
  }));
  if (!hist.length) $('timeline').append(h('li', {}, 'no epoch yet: not claimed'));
}

// ---- logs ----------------------------------------------------------------------------------

function appendLog(text, cls) {
  const pre = $('log');
  pre.append(cls ? h('span', { class: cls }, text) : document.createTextNode(text));
  // Keep the page small: drop the oldest pieces past the limit.
  while (pre.textContent.length > LOG_KEEP && pre.childNodes.length > 1) pre.firstChild.remove();
  if ($('follow').checked) pre.scrollTop = pre.scrollHeight;
}

async function pollLogs() {
  const L = S.log;
  if (!L || L.busy || L.done) return;
  if (!token()) {
    $('log-state').textContent = 'logs need the API token (top right)';
    return;
  }
  L.busy = true;
  try {
    const q = `/api/v1/tasks/${encodeURIComponent(L.task)}/logs?offset=${L.offset}`;
    const c = await api(q, { headers: authHeaders() });
    if (S.log !== L) return; // the page moved on
    if (L.epoch !== null && c.epoch !== L.epoch) {
      appendLog(`\n--- epoch ${c.epoch} on ${short(c.owner)} ---\n`, 'mark');
      L.offset = 0;
      L.epoch = c.epoch;
      return; // ask again from the start of the new epoch's log
    }
    L.epoch = c.epoch;
    if (c.data) appendLog(c.data);
    L.offset = c.next_offset;
    L.error = null;
    const more = c.data && c.data.length > 0;
    $('log-state').textContent = `epoch ${c.epoch} on ${short(c.owner)} · ${c.state}` +
      `${c.running ? ' · following' : ' · ended'}`;
    $('log').setAttribute('data-state', c.state);
    if (!c.running && !more && CODES[c.state] >= 300) L.done = true;
  } catch (e) {
    if (S.log === L) $('log-state').textContent = `logs: ${e.message}`;
  } finally {
    L.busy = false;
  }
}

function startLogs(task) {
  S.log = { task, epoch: null, offset: 0, done: false, busy: false };
  $('log').replaceChildren();
  $('log').removeAttribute('data-state');
  $('log-state').textContent = '';
  pollLogs();
}

// ---- cancel --------------------------------------------------------------------------------

function hexBytes(s) {
  const clean = s.trim().toLowerCase();
  if (!/^([0-9a-f]{2})+$/.test(clean)) throw new Error('not hex');
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.substr(i * 2, 2), 16);
  return out;
}

const toHex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

function b64url(s) {
  const b = atob(s.replace(/-/g, '+').replace(/_/g, '/'));
  return Uint8Array.from(b, (c) => c.charCodeAt(0));
}

// Signs `omesh/cancel/v1 || task id` with the submitter's ed25519 seed (64 hex characters),
// as `omesh cancel --key` does. The key is imported for this one signature and dropped.
async function signCancel(keyHex, taskHex) {
  if (!window.isSecureContext || !crypto.subtle) {
    throw new Error('signing needs a secure context: open the dashboard at http://127.0.0.1 ' +
      '(an SSH tunnel will do) or use `omesh cancel`');
  }
  let seed;
  try {
    seed = hexBytes(keyHex);
  } catch (_) {
    seed = null;
  }
  if (!seed || seed.length !== 32) throw new Error('the submitter key is 64 hex characters');
  // PKCS#8 wrapping of a raw ed25519 seed (RFC 8410).
  const prefix = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
  const pkcs8 = new Uint8Array(48);
  pkcs8.set(prefix, 0);
  pkcs8.set(seed, 16);
  const key = await crypto.subtle.importKey('pkcs8', pkcs8, { name: 'Ed25519' }, true, ['sign']);
  const jwk = await crypto.subtle.exportKey('jwk', key);
  const msg = new Uint8Array([...new TextEncoder().encode('omesh/cancel/v1'), ...hexBytes(taskHex)]);
  const sig = new Uint8Array(await crypto.subtle.sign({ name: 'Ed25519' }, key, msg));
  seed.fill(0);
  pkcs8.fill(0);
  return { submitter: toHex(b64url(jwk.x)), signature: toHex(sig) };
}

async function onCancel(ev) {
  ev.preventDefault();
  const id = S.route.task;
  const out = $('cancel-state');
  out.className = 'muted';
  out.textContent = 'signing…';
  const tok = $('cancel-token').value.trim();
  const keyInput = $('cancel-key');
  try {
    if (!tok) throw new Error('the API token is needed');
    const body = await signCancel(keyInput.value, id);
    keyInput.value = '';
    setToken(tok);
    await api(`/api/v1/tasks/${encodeURIComponent(id)}`, {
      method: 'DELETE',
      headers: { Authorization: `Bearer ${tok}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    out.className = 'ok';
    out.textContent = 'cancel sent: the mesh will stop the task';
  } catch (e) {
    out.className = 'err';
    out.textContent = `cancel failed: ${e.message}`;
  }
}

// ---- token, routing, start -----------------------------------------------------------------

function renderToken() {
  const has = !!token();
  $('token-state').textContent = has ? 'kept for this tab' : '';
  $('token').value = '';
  $('token').placeholder = has ? '•••••• (kept)' : 'for logs and cancel';
  $('cancel-token').value = token();
}

function route() {
  const m = /^#\/task\/([0-9a-f]{64})$/.exec(location.hash);
  if (m) {
    S.route = { view: 'task', task: m[1] };
    if (!S.log || S.log.task !== m[1]) startLogs(m[1]);
  } else {
    S.route = { view: 'mesh', task: null };
    S.log = null;
  }
  $('view-mesh').hidden = S.route.view !== 'mesh';
  $('view-task').hidden = S.route.view !== 'task';
  $('cancel-state').textContent = '';
  render();
}

function start() {
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('token').value.trim();
    if (v) setToken(v);
    if (S.log) {
      S.log.done = false;
      pollLogs();
    }
  });
  $('token-forget').addEventListener('click', () => setToken(''));
  $('cancel-form').addEventListener('submit', onCancel);
  window.addEventListener('hashchange', route);
  renderToken();
  route();
  poll();
  setInterval(pollLogs, POLL_MS);
}

document.addEventListener('DOMContentLoaded', start);
