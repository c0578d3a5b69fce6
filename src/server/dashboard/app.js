// The weft dashboard: one page, hash routes, no dependencies.
//
//   #/runs?state=Running&project=etl&flow=ID   flow runs, newest first, live
//   #/runs/ID                                  one run: facts, parameters, history, task runs, logs (live)
//   #/flows?project=etl                        flows, with Run (a form: parameters, labels) and schedule pause/resume
//   #/agents                                   agents the server has seen
//
// Data comes from the JSON API with `Authorization: Bearer <token>` when the server asks
// for one (a 401 shows the token form), and stays current through the `/api/events`
// WebSocket feed: each view opens the feed it needs, re-reads its data whenever the feed
// (re)opens, and merges events and reads by version, so their order does not matter.
// Text from the server only ever reaches the page through textContent / text nodes.

const RUN_STATES = ['Scheduled', 'Submitted', 'Running', 'Cancelling', 'Success', 'Failed', 'Cancelled'];
const FINAL = new Set(['Success', 'Failed', 'Cancelled']);
const RUNS_SHOWN = 200;
const LOGS_KEPT = 5000;
const LOG_PAGE = 1000;

const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

// ---------------------------------------------------------------------------------
// DOM and formatting

/** An element; string children become text nodes (never markup). */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

/** One row per item in `tbody` (`rowOf`), or one row saying `empty` across `colspan` cells. */
function fillRows(tbody, items, colspan, empty, rowOf) {
  if (items.length === 0) tbody.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan }, empty)));
  else tbody.replaceChildren(...items.map(rowOf));
}

const stateBadge = (state) => h('span', { class: `state state-${state}`, 'data-state': state }, state);
const runHref = (id) => `#/runs/${encodeURIComponent(id)}`;
const pad = (n) => String(n).padStart(2, '0');

function fmtTime(ms) {
  if (ms === null || ms === undefined) return '—';
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtDuration(ms) {
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${(ms / 1000).toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} m ${s % 60} s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ${m % 60} m`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

/**
 * A duration: fixed when the thing ended, else ticking from its start (the clock below
 * updates every `[data-from]` once a second; no request is made).
 */
function duration(tag, startedAt, endedAt) {
  if (startedAt === null || startedAt === undefined) return h(tag, { class: 'num' }, '—');
  if (endedAt !== null && endedAt !== undefined) return h(tag, { class: 'num' }, fmtDuration(endedAt - startedAt));
  return h(tag, { class: 'num', 'data-from': startedAt }, fmtDuration(Date.now() - startedAt));
}
const durationCell = (startedAt, endedAt) => duration('td', startedAt, endedAt);

setInterval(() => {
  for (const el of document.querySelectorAll('[data-from]')) el.textContent = fmtDuration(Date.now() - Number(el.getAttribute('data-from')));
  for (const el of document.querySelectorAll('[data-ago]')) el.textContent = `${fmtDuration(Date.now() - Number(el.getAttribute('data-ago')))} ago`;
}, 1000);

function showError(err) {
  const box = $('error');
  if (err === null) {
    box.hidden = true;
    box.textContent = '';
    return;
  }
  box.textContent = err instanceof Error ? err.message : String(err);
  box.hidden = false;
}

/** Run `fn` at most once per `ms`, after the burst that asked for it. */
function batched(fn, ms = 40) {
  let timer = null;
  return () => {
    if (timer !== null) return;
    timer = setTimeout(() => {
      timer = null;
      fn();
    }, ms);
  };
}

// ---------------------------------------------------------------------------------
// Token and API

const TOKEN_KEY = 'weft.token';
const getToken = () => sessionStorage.getItem(TOKEN_KEY) ?? localStorage.getItem(TOKEN_KEY) ?? '';
function setToken(token, remember) {
  sessionStorage.setItem(TOKEN_KEY, token);
  if (remember) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
  $('forget').hidden = false;
}
function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  $('forget').hidden = true;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

/** One API call: the JSON answer, or an ApiError (a 401 also shows the token form). */
async function api(method, path, body) {
  const headers = { accept: 'application/json' };
  const token = getToken();
  if (token !== '') headers.authorization = `Bearer ${token}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let value = null;
  try {
    value = text === '' ? null : JSON.parse(text);
  } catch {
    // Not JSON: the status says what happened.
  }
  if (!res.ok) {
    const e = value !== null && typeof value === 'object' ? value.error : undefined;
    const err = new ApiError(res.status, e?.code ?? 'HTTP', e?.message ?? `${method} ${path}: ${res.status} ${res.statusText}`);
    if (res.status === 401) showLogin(token === '' ? 'Enter an API token to continue.' : 'The server refused the token: enter another one.');
    throw err;
  }
  return value;
}

/** Report a failed call, except a 401 (the token form says it). */
function reportError(err) {
  if (err instanceof ApiError && err.status === 401) return;
  // fetch rejects with a TypeError when the server cannot be reached at all.
  showError(err instanceof TypeError ? `Cannot reach the weft server (${err.message}); retrying with the live feed.` : err);
}

function showLogin(why) {
  feed.stop();
  $('login-why').textContent = why;
  $('view').hidden = true;
  const form = $('login');
  if (form.hidden) {
    form.hidden = false;
    /** @type {HTMLInputElement} */ ($('token')).value = '';
    $('token').focus();
  }
}

// ---------------------------------------------------------------------------------
// The live feed

/**
 * One WebSocket at a time, for the current view: all events, or one run's. It calls
 * `view.load()` each time it opens (what happened while it was down is read again) and
 * reconnects with exponential backoff (0.5 s doubling to 30 s, jittered, back to 0.5 s
 * after a connection that stayed up for 5 s) when it drops.
 */
const feed = {
  ws: null,
  view: null,
  attempt: 0,
  timer: null,
  follow(view) {
    this.stop();
    this.view = view;
    this.attempt = 0;
    this.connect();
  },
  stop() {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws !== null) ws.close(1000, 'view changed');
    this.status('off', 'offline');
  },
  status(cls, text) {
    const el = $('feed');
    el.className = `feed ${cls}`;
    el.textContent = text;
  },
  connect() {
    const view = this.view;
    if (view === null) return;
    const q = new URLSearchParams();
    if (view.feedRun !== undefined) q.set('flowRun', view.feedRun);
    const token = getToken();
    if (token !== '') q.set('token', token);
    const qs = q.toString();
    const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/events${qs === '' ? '' : `?${qs}`}`);
    this.ws = ws;
    this.status('', 'connecting');
    let opened = false;
    let openedAt = 0;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      openedAt = Date.now();
      this.status('live', 'live');
      showError(null);
      view.load();
    };
    ws.onmessage = (m) => {
      if (this.ws !== ws) return;
      let e;
      try {
        e = JSON.parse(m.data);
      } catch {
        return;
      }
      view.onEvent(e);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      // Never opened: maybe the token (a WebSocket cannot tell us the status); a read
      // answers 401 and shows the form, or shows the data while the feed is down.
      if (!opened) view.load();
      // Back to the shortest wait only after a connection that lasted: a server that
      // accepts and drops at once is not hammered.
      if (opened && Date.now() - openedAt > 5000) this.attempt = 0;
      const delay = Math.min(30_000, 500 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt = Math.min(this.attempt + 1, 10);
      this.status('down', `reconnecting in ${Math.ceil(delay / 1000)} s`);
      this.timer = setTimeout(() => {
        this.timer = null;
        this.connect();
      }, delay);
    };
  },
};

// ---------------------------------------------------------------------------------
// Views: { el, feedRun?, load(), onEvent(e), dispose() }

/** Newer of two records by a version field (the one already held on a tie). */
const newer = (held, got, field) => (held === undefined || got[field] > held[field] ? got : held);

function runsView(params) {
  const state = params.get('state') ?? '';
  const project = params.get('project') ?? '';
  const flowId = params.get('flow') ?? '';
  /** @type {Map<string, any>} */
  let runs = new Map();
  /** Runs from events since the current read began: merged into its answer. */
  let fresh = null;
  let projectsShown = false;
  /** Reads started: the answer of one that a later one overtook is dropped. */
  let reads = 0;

  const matches = (r) => (state === '' || r.state === state) && (project === '' || r.project === project) && (flowId === '' || r.flowId === flowId);
  const setFilter = (k, v) => {
    const q = new URLSearchParams(params);
    if (v === '') q.delete(k);
    else q.set(k, v);
    const s = q.toString();
    location.hash = `#/runs${s === '' ? '' : `?${s}`}`;
  };

  const stateSel = h('select', { id: 'state-filter', onchange: () => setFilter('state', stateSel.value) }, h('option', { value: '' }, 'all states'));
  for (const s of RUN_STATES) stateSel.append(h('option', { value: s, selected: s === state }, s));
  const projectSel = h('select', { id: 'project-filter', onchange: () => setFilter('project', projectSel.value) }, h('option', { value: '' }, 'all projects'));
  if (project !== '') projectSel.append(h('option', { value: project, selected: true }, project));
  const count = h('span', { class: 'muted' });
  const tbody = h('tbody');
  const el = h(
    'section',
    { id: 'runs' },
    h('h1', null, 'Flow runs'),
    h(
      'div',
      { class: 'toolbar' },
      h('label', null, 'State ', stateSel),
      h('label', null, 'Project ', projectSel),
      flowId !== '' && h('span', { class: 'chip' }, 'one flow ', h('a', { href: '#', onclick: (ev) => (ev.preventDefault(), setFilter('flow', '')) }, '×')),
      count,
    ),
    h(
      'table',
      { id: 'runs-table' },
      h('thead', null, h('tr', null, ['Run', 'Flow', 'Version', 'State', 'Scheduled start', 'Duration', 'Message'].map((t) => h('th', null, t)))),
      tbody,
    ),
  );

  const render = () => {
    const rows = [...runs.values()].sort((a, b) => b.scheduledStart - a.scheduledStart || (a.id < b.id ? -1 : 1)).slice(0, RUNS_SHOWN);
    count.textContent = `${rows.length}${runs.size > rows.length ? '+' : ''} run${rows.length === 1 ? '' : 's'}`;
    fillRows(tbody, rows, 7, 'No flow runs', (r) =>
        h(
          'tr',
          { 'data-run': r.id },
          h('td', null, h('a', { href: runHref(r.id) }, r.id.slice(0, 8))),
          h('td', { class: 'flow' }, h('a', { href: `#/runs?flow=${encodeURIComponent(r.flowId)}` }, r.flowName), ' ', h('span', { class: 'muted' }, r.project)),
          h('td', { class: 'num' }, `v${r.version}`),
          h('td', null, stateBadge(r.state)),
          h('td', { class: 'num' }, fmtTime(r.scheduledStart)),
          durationCell(r.startedAt, r.endedAt),
          h('td', { class: 'msg' }, r.message ?? ''),
        ),
    );
  };
  const rerender = batched(render);

  return {
    el,
    async load() {
      const q = new URLSearchParams({ limit: String(RUNS_SHOWN) });
      if (state !== '') q.set('state', state);
      if (project !== '') q.set('project', project);
      if (flowId !== '') q.set('flowId', flowId);
      const mine = new Map();
      fresh = mine;
      const read = ++reads;
      try {
        const [list, projects] = await Promise.all([api('GET', `/api/flow-runs?${q}`), projectsShown ? null : api('GET', '/api/projects')]);
        if (projects !== null && !projectsShown) {
          projectsShown = true;
          for (const p of projects) if (p.name !== project) projectSel.append(h('option', { value: p.name }, p.name));
        }
        if (read !== reads) return;
        const next = new Map(list.map((r) => [r.id, r]));
        for (const [id, r] of mine) {
          const got = newer(next.get(id), r, 'stateVersion');
          if (matches(got)) next.set(id, got);
          else next.delete(id);
        }
        runs = next;
        render();
      } catch (err) {
        reportError(err);
      } finally {
        if (fresh === mine) fresh = null;
      }
    },
    onEvent(e) {
      if (e.type !== 'flowRun') return;
      const r = e.run;
      fresh?.set(r.id, newer(fresh.get(r.id), r, 'stateVersion'));
      const got = newer(runs.get(r.id), r, 'stateVersion');
      if (matches(got)) runs.set(r.id, got);
      else runs.delete(r.id);
      rerender();
    },
    dispose() {},
  };
}

function runView(id) {
  let run = null;
  let history = [];
  /** @type {Map<string, any>} by key and map index */
  const tasks = new Map();
  const logSeqs = new Set();
  let lastSeq = 0;
  let historyAsked = 0;

  const facts = h('dl', { class: 'facts', id: 'run-facts' });
  const actions = h('div', { class: 'toolbar' });
  const params = h('pre', { id: 'run-parameters' });
  const historyBody = h('tbody');
  const taskBody = h('tbody');
  const logs = h('div', { class: 'logs', id: 'run-logs' });
  const title = h('h1', null, 'Flow run ', h('span', { class: 'muted' }, id.slice(0, 8)));
  const el = h(
    'section',
    { id: 'run', 'data-run': id },
    title,
    actions,
    h(
      'div',
      { class: 'cols' },
      h('div', null, facts, h('h2', null, 'Parameters'), params),
      h(
        'div',
        null,
        h('h2', null, 'State history'),
        h('table', { id: 'run-history' }, h('thead', null, h('tr', null, ['State', 'At', 'Message'].map((t) => h('th', null, t)))), historyBody),
      ),
    ),
    h('h2', null, 'Task runs'),
    h(
      'table',
      { id: 'task-runs' },
      h('thead', null, h('tr', null, ['Task', 'Map index', 'State', 'Attempts', 'Duration', 'Message'].map((t) => h('th', null, t)))),
      taskBody,
    ),
    h('h2', null, 'Logs'),
    logs,
  );

  const cancel = async (btn) => {
    if (!confirm('Cancel this flow run?')) return;
    btn.disabled = true;
    try {
      const r = await api('POST', `/api/flow-runs/${encodeURIComponent(id)}/cancel`, {});
      setRun(r);
      loadHistory();
    } catch (err) {
      btn.disabled = false;
      reportError(err);
    }
  };
  const runAgain = async (btn) => {
    btn.disabled = true;
    try {
      const r = await api('POST', '/api/flow-runs', { flowId: run.flowId, versionId: run.versionId, parameters: run.parameters });
      location.hash = runHref(r.id);
    } catch (err) {
      btn.disabled = false;
      reportError(err);
    }
  };

  const renderRun = () => {
    if (run === null) return;
    title.replaceChildren(`${run.flowName} `, stateBadge(run.state));
    const fact = (k, v) => [h('dt', null, k), h('dd', null, v)];
    facts.replaceChildren(
      ...fact('Run', run.id),
      ...fact('Flow', h('a', { href: `#/runs?flow=${encodeURIComponent(run.flowId)}` }, run.flowName)),
      ...fact('Project', run.project),
      ...fact('Version', `v${run.version}`),
      ...fact('State', stateBadge(run.state)),
      ...fact('Message', run.message ?? '—'),
      ...fact('Scheduled start', fmtTime(run.scheduledStart)),
      ...fact('Started', fmtTime(run.startedAt)),
      ...fact('Ended', fmtTime(run.endedAt)),
      ...fact('Duration', duration('span', run.startedAt, run.endedAt)),
      ...fact('Labels', run.labels.length === 0 ? '—' : run.labels.join(', ')),
      ...fact('Agent', run.agentId ?? '—'),
      ...fact('Restarts', String(run.restarts)),
    );
    params.textContent = JSON.stringify(run.parameters, null, 2);
    const buttons = [];
    if (!FINAL.has(run.state) && run.state !== 'Cancelling') {
      const b = h('button', { type: 'button', class: 'danger', id: 'cancel-run', onclick: () => void cancel(b) }, 'Cancel');
      buttons.push(b);
    }
    const again = h('button', { type: 'button', id: 'run-again', onclick: () => void runAgain(again) }, 'Run again');
    buttons.push(again);
    actions.replaceChildren(...buttons);
  };
  const setRun = (r) => {
    if (run !== null && r.stateVersion <= run.stateVersion) return;
    const changed = run !== null;
    run = r;
    renderRun();
    if (changed) loadHistory();
  };

  const renderHistory = () =>
    historyBody.replaceChildren(
      ...history.map((s) => h('tr', null, h('td', null, stateBadge(s.state)), h('td', { class: 'num' }, fmtTime(s.at)), h('td', { class: 'msg' }, s.message ?? ''))),
    );
  const loadHistory = async () => {
    const ask = ++historyAsked;
    try {
      const got = await api('GET', `/api/flow-runs/${encodeURIComponent(id)}/history`);
      if (ask !== historyAsked) return;
      history = got;
      renderHistory();
    } catch (err) {
      reportError(err);
    }
  };

  const taskKey = (t) => `${t.key}\u0000${t.mapIndex}`;
  const renderTasks = () => {
    const rows = [...tasks.values()].sort(
      (a, b) => (a.startedAt ?? Infinity) - (b.startedAt ?? Infinity) || (a.key < b.key ? -1 : a.key > b.key ? 1 : a.mapIndex - b.mapIndex),
    );
    fillRows(taskBody, rows, 6, 'No task runs yet', (t) =>
        h(
          'tr',
          { 'data-task': t.key },
          h('td', null, t.key),
          h('td', { class: 'num' }, t.mapIndex < 0 ? '—' : String(t.mapIndex)),
          h('td', null, stateBadge(t.state)),
          h('td', { class: 'num' }, String(t.attempts)),
          durationCell(t.startedAt, t.endedAt),
          h('td', { class: 'msg' }, t.message ?? ''),
        ),
    );
  };
  const rerenderTasks = batched(renderTasks);
  const setTask = (t) => tasks.set(taskKey(t), newer(tasks.get(taskKey(t)), t, 'version'));

  const addLog = (e) => {
    if (logSeqs.has(e.seq)) return;
    logSeqs.add(e.seq);
    logs.querySelector('[data-seq="0"]')?.remove();
    const where = e.taskKey === undefined || e.taskKey === null ? '' : `${e.taskKey}${e.mapIndex !== undefined && e.mapIndex !== null && e.mapIndex >= 0 ? `[${e.mapIndex}]` : ''}`;
    const line = h(
      'div',
      { class: `lvl-${e.level}`, 'data-seq': e.seq },
      h('span', { class: 'at' }, fmtTime(e.at)),
      ` ${e.level.toUpperCase().padEnd(5)} `,
      where !== '' && h('span', { class: 'task' }, `${where} `),
      e.message,
    );
    const stick = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
    if (e.seq > lastSeq) {
      logs.append(line);
      lastSeq = e.seq;
    } else {
      // Out of order (a batch that committed late): put it where its seq says.
      const after = [...logs.children].find((c) => Number(c.getAttribute('data-seq')) > e.seq);
      logs.insertBefore(line, after ?? null);
    }
    while (logs.children.length > LOGS_KEPT) logs.firstElementChild?.remove();
    if (stick) logs.scrollTop = logs.scrollHeight;
  };

  return {
    el,
    feedRun: id,
    async load() {
      try {
        const [r, tr] = await Promise.all([
          api('GET', `/api/flow-runs/${encodeURIComponent(id)}`),
          api('GET', `/api/flow-runs/${encodeURIComponent(id)}/task-runs`),
          loadHistory(),
        ]);
        setRun(r);
        for (const t of tr) setTask(t);
        renderTasks();
        // Only what is past the newest line held: a reconnect does not read it all again.
        for (let page = 0; page < 20; page++) {
          const got = await api('GET', `/api/flow-runs/${encodeURIComponent(id)}/logs?after=${lastSeq}&limit=${LOG_PAGE}`);
          for (const e of got) addLog(e);
          if (got.length < LOG_PAGE) break;
        }
        if (logs.children.length === 0) logs.append(h('div', { class: 'muted', 'data-seq': 0 }, 'No logs yet'));
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) el.replaceChildren(h('h1', null, 'Flow run not found'), h('p', { class: 'muted' }, err.message));
        else reportError(err);
      }
    },
    onEvent(e) {
      if (e.type === 'flowRun' && e.run.id === id) setRun(e.run);
      else if (e.type === 'taskRun' && e.task.flowRunId === id) {
        setTask(e.task);
        rerenderTasks();
      } else if (e.type === 'log' && e.entry.flowRunId === id) {
        addLog(e.entry);
      }
    },
    dispose() {},
  };
}

function describeSchedule(s) {
  if (s === null || s.clocks.length === 0) return '—';
  const clocks = s.clocks.map((c) => (c.kind === 'interval' ? `every ${fmtDuration(c.everyMs)}` : `cron ${c.cron}`)).join(', ');
  return s.paused === true ? `${clocks} (paused)` : clocks;
}

/**
 * The form "Run" opens on the flows page: one field per parameter of the flow's newest
 * version, prefilled with its default as JSON, and extra labels. Values are strict JSON
 * (a string needs its double quotes): a bare-string fallback would make `true` and `tru`
 * different types, so a typo could change what the flow receives without a word. A field
 * left empty, or at its default, is not sent: the flow's default applies, as with a run
 * made without parameters, and the run records only what was chosen. Everything is
 * checked here before a request is made; what the server still refuses (a 400) is shown
 * in the form, with the values kept.
 */
function runFormPanel() {
  const el = h('form', { id: 'run-form', class: 'panel', novalidate: true, hidden: true });
  /** Opens started: a version read that a later open overtook is dropped. */
  let opens = 0;

  const close = () => {
    opens++;
    el.hidden = true;
    el.removeAttribute('data-flow');
    el.replaceChildren();
  };
  el.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') close();
  });

  const formError = h('div', { class: 'form-error', id: 'run-form-error', role: 'alert', hidden: true });
  const say = (err) => {
    if (err === null) {
      formError.hidden = true;
      formError.textContent = '';
      return;
    }
    formError.textContent =
      err instanceof TypeError ? `Cannot reach the weft server (${err.message}).` : err instanceof Error ? err.message : String(err);
    formError.hidden = false;
  };

  /** One parameter's field: { p, input, check() → [ok, value | undefined] }. */
  const field = (p, i) => {
    const id = `run-param-${i}`;
    const input = h('input', {
      id,
      type: 'text',
      class: 'json',
      spellcheck: 'false',
      autocomplete: 'off',
      required: p.required,
      'aria-describedby': `${id}-error`,
    });
    input.value = p.default === undefined ? '' : JSON.stringify(p.default);
    const problem = h('span', { class: 'field-error', id: `${id}-error`, hidden: true });
    const row = h(
      'div',
      { class: 'field', 'data-param': p.name },
      h('label', { for: id }, h('code', null, p.name), p.required ? h('span', { class: 'req' }, ' required') : h('span', { class: 'muted' }, ' optional')),
      input,
      problem,
    );
    const wrong = (msg) => {
      problem.textContent = msg;
      problem.hidden = false;
      input.setAttribute('aria-invalid', 'true');
      return [false, undefined];
    };
    const check = () => {
      problem.hidden = true;
      problem.textContent = '';
      input.removeAttribute('aria-invalid');
      const raw = input.value.trim();
      if (raw === '') return p.required ? wrong('Required: enter a JSON value.') : [true, undefined];
      let value;
      try {
        value = JSON.parse(raw);
      } catch (err) {
        return wrong(`Not valid JSON (${err instanceof Error ? err.message : String(err)}); a string needs double quotes: "text".`);
      }
      // At its default: leave it to the flow (a required one is always sent).
      if (!p.required && p.default !== undefined && JSON.stringify(value) === JSON.stringify(p.default)) return [true, undefined];
      return [true, value];
    };
    return { row, input, name: p.name, check };
  };

  const build = (f, version) => {
    const fields = version.parameters.map(field);
    const labels = h('input', { id: 'run-labels', type: 'text', autocomplete: 'off', placeholder: 'e.g. gpu, nightly' });
    const submit = h('button', { type: 'submit', id: 'run-submit' }, 'Create run');
    const cancel = h('button', { type: 'button', id: 'run-cancel', onclick: close }, 'Cancel');
    el.onsubmit = async (ev) => {
      ev.preventDefault();
      say(null);
      const parameters = {};
      let firstBad = null;
      for (const fl of fields) {
        const [ok, value] = fl.check();
        if (!ok) firstBad ??= fl.input;
        else if (value !== undefined) parameters[fl.name] = value;
      }
      if (firstBad !== null) {
        firstBad.focus();
        return;
      }
      const extra = [...new Set(labels.value.split(',').map((l) => l.trim()).filter((l) => l !== ''))];
      const body = { flowId: f.id, versionId: version.id, parameters };
      if (extra.length > 0) body.labels = extra;
      submit.disabled = true;
      try {
        const r = await api('POST', '/api/flow-runs', body);
        location.hash = runHref(r.id);
      } catch (err) {
        submit.disabled = false;
        // A 401 shows the token form instead.
        if (!(err instanceof ApiError && err.status === 401)) say(err);
      }
    };
    el.replaceChildren(
      h('h2', null, 'Run ', h('span', { class: 'name' }, f.name), ' ', h('span', { class: 'muted' }, `${f.project} · v${version.version}`)),
      fields.length === 0
        ? h('p', { class: 'muted' }, 'This flow takes no parameters.')
        : h(
            'p',
            { class: 'hint' },
            'Values are JSON: "text" (with its double quotes), 42, true, null, [1, 2], {"k": 1}. ',
            'An optional field left empty or at its default is not sent: the flow uses its default.',
          ),
      ...fields.map((fl) => fl.row),
      h(
        'div',
        { class: 'field' },
        h('label', { for: 'run-labels' }, 'Labels ', h('span', { class: 'muted' }, 'optional, comma separated')),
        labels,
        h('span', { class: 'hint' }, version.labels.length === 0 ? 'Added to the run.' : `Added to the version's: ${version.labels.join(', ')}.`),
      ),
      formError,
      h('div', { class: 'toolbar' }, submit, cancel),
    );
    (fields[0]?.input ?? labels).focus();
  };

  return {
    el,
    /** Shows the form for flow `f` (a flows-list record), replacing any other. */
    async open(f) {
      const open = ++opens;
      el.hidden = false;
      el.setAttribute('data-flow', f.id);
      el.onsubmit = (ev) => ev.preventDefault();
      say(null);
      el.replaceChildren(h('p', { class: 'muted' }, `Reading the parameters of ${f.name} v${f.version}…`), formError);
      try {
        const version = await api('GET', `/api/flow-versions/${encodeURIComponent(f.versionId)}`);
        if (open !== opens) return;
        build(f, version);
      } catch (err) {
        if (open !== opens) return;
        if (!(err instanceof ApiError && err.status === 401)) {
          say(err);
          el.append(h('div', { class: 'toolbar' }, h('button', { type: 'button', id: 'run-cancel', onclick: close }, 'Cancel')));
        }
      }
    },
  };
}

function flowsView(params) {
  const project = params.get('project') ?? '';
  /** @type {Map<string, any>} */
  let flows = new Map();
  let fresh = null;
  let reads = 0;
  const tbody = h('tbody');
  const runForm = runFormPanel();
  const el = h(
    'section',
    { id: 'flows' },
    h('h1', null, 'Flows'),
    project !== '' && h('div', { class: 'toolbar' }, h('span', { class: 'chip' }, `project ${project} `, h('a', { href: '#/flows' }, '×'))),
    runForm.el,
    h(
      'table',
      { id: 'flows-table' },
      h('thead', null, h('tr', null, ['Project', 'Name', 'Newest version', 'Schedule', 'Updated', ''].map((t) => h('th', null, t)))),
      tbody,
    ),
  );

  const setPaused = async (f, paused, btn) => {
    btn.disabled = true;
    try {
      const got = await api('POST', `/api/flows/${encodeURIComponent(f.id)}/schedule`, { paused });
      flows.set(got.id, got);
      render();
    } catch (err) {
      btn.disabled = false;
      reportError(err);
    }
  };

  const render = () => {
    const rows = [...flows.values()].sort((a, b) => (a.project === b.project ? (a.name < b.name ? -1 : 1) : a.project < b.project ? -1 : 1));
    fillRows(tbody, rows, 6, 'No flows registered', (f) => {
        const run = h('button', { type: 'button', class: 'run-flow', onclick: () => void runForm.open(f) }, 'Run');
        const hasClocks = f.schedule !== null && f.schedule.clocks.length > 0;
        const paused = f.schedule?.paused === true;
        const toggle = hasClocks && h('button', { type: 'button', onclick: () => void setPaused(f, !paused, toggle) }, paused ? 'Resume schedule' : 'Pause schedule');
        return h(
          'tr',
          { 'data-flow': f.id },
          h('td', null, h('a', { href: `#/flows?project=${encodeURIComponent(f.project)}` }, f.project)),
          h('td', { class: 'name' }, h('a', { href: `#/runs?flow=${encodeURIComponent(f.id)}` }, f.name)),
          h('td', { class: 'num' }, `v${f.version}`),
          h('td', null, describeSchedule(f.schedule)),
          h('td', { class: 'num' }, fmtTime(f.updatedAt)),
          h('td', null, run, ' ', toggle),
        );
    });
  };
  const rerender = batched(render);
  const matches = (f) => project === '' || f.project === project;

  return {
    el,
    async load() {
      const mine = new Map();
      fresh = mine;
      const read = ++reads;
      try {
        const list = await api('GET', `/api/flows${project === '' ? '' : `?project=${encodeURIComponent(project)}`}`);
        if (read !== reads) return;
        const next = new Map(list.map((f) => [f.id, f]));
        for (const [id, f] of mine) next.set(id, newer(next.get(id), f, 'updatedAt'));
        flows = next;
        render();
      } catch (err) {
        reportError(err);
      } finally {
        if (fresh === mine) fresh = null;
      }
    },
    onEvent(e) {
      if (e.type !== 'flow' || !matches(e.flow)) return;
      fresh?.set(e.flow.id, e.flow);
      flows.set(e.flow.id, e.flow);
      rerender();
    },
    dispose() {},
  };
}

function agentsView() {
  const tbody = h('tbody');
  const refresh = h('button', { type: 'button', id: 'refresh-agents', onclick: () => void view.load() }, 'Refresh');
  const el = h(
    'section',
    { id: 'agents' },
    h('h1', null, 'Agents'),
    h('div', { class: 'toolbar' }, refresh, h('span', { class: 'muted' }, 'Agents are not on the live feed: refresh to see new ones.')),
    h(
      'table',
      { id: 'agents-table' },
      h('thead', null, h('tr', null, ['Name', 'Kind', 'Labels', 'Last seen', 'Status'].map((t) => h('th', null, t)))),
      tbody,
    ),
  );
  const view = {
    el,
    async load() {
      try {
        const list = await api('GET', '/api/agents');
        fillRows(tbody, list, 5, 'No agents have registered', (a) =>
            h(
              'tr',
              { 'data-agent': a.id },
              h('td', null, a.name),
              h('td', null, a.kind),
              h('td', null, a.labels.join(', ')),
              h('td', { class: 'num', 'data-ago': a.lastSeen, title: fmtTime(a.lastSeen) }, `${fmtDuration(Date.now() - a.lastSeen)} ago`),
              h('td', null, h('span', { class: `state state-${a.status === 'healthy' ? 'Success' : 'Failed'}` }, a.status)),
            ),
        );
      } catch (err) {
        reportError(err);
      }
    },
    onEvent() {},
    dispose() {},
  };
  return view;
}

// ---------------------------------------------------------------------------------
// Router

let current = null;

function route() {
  const raw = location.hash.replace(/^#/, '');
  const [pathPart, queryPart] = raw.split('?', 2);
  const path = (pathPart ?? '').replace(/\/+$/, '') || '/runs';
  const params = new URLSearchParams(queryPart ?? '');
  current?.dispose();
  showError(null);
  let section = 'runs';
  let view;
  const m = /^\/runs\/(.+)$/.exec(path);
  if (m !== null) view = runView(decodeURIComponent(m[1]));
  else if (path === '/flows') {
    section = 'flows';
    view = flowsView(params);
  } else if (path === '/agents') {
    section = 'agents';
    view = agentsView();
  } else view = runsView(params);
  for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('active', a.getAttribute('data-nav') === section);
  current = view;
  $('login').hidden = true;
  $('view').hidden = false;
  $('view').replaceChildren(view.el);
  view.load();
  feed.follow(view);
}

$('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const token = /** @type {HTMLInputElement} */ ($('token')).value.trim();
  if (token === '') return;
  setToken(token, /** @type {HTMLInputElement} */ ($('remember')).checked);
  route();
});
$('forget').addEventListener('click', () => {
  forgetToken();
  route();
});
$('forget').hidden = getToken() === '';
window.addEventListener('hashchange', route);
route();
