/**
 * The cluster wire protocol with real msgpackr: every op round-trips between a sender's
 * and a receiver's codec (record structures negotiated across frames), reconnects reset
 * both, every malformed input is a ProtocolError with its code, and the Batcher sends
 * one frame per tick, flushes early past its size threshold and bounds its queue.
 */
import { Packr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import {
  Batcher,
  DEFAULT_MAX_FRAME_BYTES,
  FrameCodec,
  GraphDecoder,
  GraphEncoder,
  OPS,
  PROTOCOL_VERSION,
  ProtocolError,
  TYPED_COLUMN_MIN,
  checkVersion,
  dispatch,
  directionsOf,
  errorFromWire,
  fromColumns,
  fromWireNode,
  outcomesFromColumns,
  outcomesOf,
  outcomesToColumns,
  toColumns,
  toWireNode,
  wireError,
  type Direction,
  type GraphNodesMsg,
  type Handlers,
  type Message,
  type MessageTo,
  type Op,
  type CallColumns,
  type NodeColumns,
  type OutcomeColumns,
  type WireCall,
  type WireOutcome,
  type WireNode,
  type WorkerToScheduler,
} from '../src/cluster/protocol.ts';
import { deserializeError, serializeError, SkipSignal, TaskTimeoutError, WeftError } from '../src/errors.ts';
import { taskOptions } from '../src/flow/defaults.ts';
import { inlineFn, inlineOpOf } from '../src/flow/inline.ts';
import type { NodeSpec } from '../src/flow/spec.ts';

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

const err = { name: 'TaskTimeoutError', message: 'too slow', stack: 'TaskTimeoutError: too slow\n    at x', code: 'TASK_TIMEOUT' };

/** One sample of every op (a Record over Op, so a new op without a sample fails to compile). */
const samples: { [K in Op]: Extract<Message, { op: K }> } = {
  hello: {
    op: 'hello',
    version: PROTOCOL_VERSION,
    role: 'worker',
    name: 'w-1',
    resources: { GPU: 1 },
    threads: 4,
    memoryLimit: 2 * 1024 ** 3,
    address: 'ws://127.0.0.1:40001',
    pid: 1234,
  },
  challenge: { op: 'challenge', nonce: new Uint8Array(32).fill(7) },
  proof: { op: 'proof', proof: new Uint8Array(32).fill(9) },
  welcome: { op: 'welcome', version: PROTOCOL_VERSION, id: 'worker-3', heartbeatMs: 500, maxFrameBytes: DEFAULT_MAX_FRAME_BYTES },
  refuse: { op: 'refuse', code: 'AUTH_FAILED', reason: 'bad proof' },
  graphBegin: {
    op: 'graphBegin',
    graph: 1,
    name: 'etl',
    nodeCount: 2,
    referenceTasks: [1],
    options: { tagLimits: {}, validate: false, events: true, summaryMs: 100, resultDir: '' },
    modules: ['file:///flows/etl.ts'],
    parameters: { n: 3, label: 'x' },
    bundle: '',
  },
  putBundle: { op: 'putBundle', hash: 'ab'.repeat(32), code: new TextEncoder().encode('export {};\n') },
  getBundle: { op: 'getBundle', id: 2, hash: 'ab'.repeat(32) },
  bundle: { op: 'bundle', id: 2, hash: 'ab'.repeat(32), code: new Uint8Array([1, 2, 3]) },
  graphNodes: { op: 'graphNodes', graph: 1, offset: 0, nodes: [] },
  graphEnd: { op: 'graphEnd', graph: 1 },
  cancelRun: { op: 'cancelRun', graph: 1 },
  releaseRun: { op: 'releaseRun', graph: 1 },
  openSession: { op: 'openSession', session: 1, flowName: 'f', modules: ['file:///m.ts'], taskKeys: ['file:///m.ts#a'], parameters: {}, bundle: '' },
  sessionReady: { op: 'sessionReady', session: 1, slots: 4 },
  submit: {
    op: 'submit',
    session: 1,
    calls: [{ id: 1, runId: 1, taskKey: 'file:///m.ts#a', key: 'a', args: [1], timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined }],
  },
  cancelCalls: { op: 'cancelCalls', session: 1, ids: [1] },
  callOutcomes: {
    op: 'callOutcomes',
    session: 1,
    outcomes: [{ id: 1, runId: 1, status: 'ok', startMs: 1, endMs: 2, value: 3, nbytes: 1, len: -1 }],
    workers: ['w-1'],
  },
  closeSession: { op: 'closeSession', session: 1 },
  runState: { op: 'runState', graph: 1, state: 'finished', flowState: 'Failed', error: err },
  taskEvents: {
    op: 'taskEvents',
    graph: 1,
    events: [
      { task: 0, key: 'a', mapIndex: -1, state: 'Running', at: 1.5, attempt: 1, worker: 'w-1' },
      { task: 0, key: 'a', mapIndex: -1, state: 'Failed', at: 2.5, attempt: 1, worker: 'w-1', error: err },
    ],
  },
  eventSummary: { op: 'eventSummary', graph: 1, counts: { Success: 10, Running: 2 }, dropped: 40 },
  getResults: { op: 'getResults', id: 5, graph: 1, tasks: [3, 4] },
  results: { op: 'results', id: 5, values: [{ rows: [1, 2] }, 'ok'] },
  compute: {
    op: 'compute',
    run: 7,
    modules: ['file:///flows/etl.ts'],
    bundle: 'sha256-abc',
    calls: [
      {
        id: 3,
        runId: 11,
        taskKey: 'file:///flows/etl.ts#load',
        key: 'load',
        args: [1, 'two', null],
        timeoutMs: 0,
        mapIndex: -1,
        attempt: 1,
        loopCount: 0,
        loopResult: null,
        deps: [{ key: '7:1', holders: ['w-2'], nbytes: 1024, arg: 2, index: -1 }],
      },
    ],
  },
  outcomes: {
    op: 'outcomes',
    run: 7,
    outcomes: [
      { id: 3, runId: 11, status: 'ok', startMs: 10, endMs: 12, value: 42, nbytes: 9, len: -1 },
      { id: 4, runId: 11, status: 'error', startMs: 10, endMs: 13, error: err, nbytes: 0, len: -1 },
    ],
  },
  credits: { op: 'credits', credits: 8 },
  cancelTasks: { op: 'cancelTasks', run: 7, tasks: [5, 6] },
  release: { op: 'release', keys: ['7:1', '7:2'] },
  whoHas: { op: 'whoHas', id: 1, keys: ['7:1'] },
  whoHasReply: { op: 'whoHasReply', id: 1, holders: [['w-2', 'w-3']], addresses: { 'w-2': 'ws://h:1', 'w-3': 'ws://h:2' } },
  getData: { op: 'getData', id: 2, keys: ['7:1'] },
  data: { op: 'data', id: 2, keys: ['7:1'], values: [new Uint8Array([1, 2, 3])], missing: ['7:9'] },
  acquire: { op: 'acquire', id: 3, from: { '7:1': 'ws://127.0.0.1:40002' } },
  acquired: { op: 'acquired', id: 3, keys: ['7:1'], missing: [] },
  steal: { op: 'steal', id: 3, run: 7, tasks: [8, 9] },
  stealReply: { op: 'stealReply', id: 3, run: 7, stolen: [8], kept: [9] },
  heartbeat: {
    op: 'heartbeat',
    at: 1700000000000.5,
    metrics: { rss: 1e8, heapUsed: 5e7, executing: 2, queued: 10, heldBytes: 4096, heldCount: 4, spilledBytes: 0, eventLoopDelayMs: 1.2 },
  },
  retire: { op: 'retire', reason: 'scaling down' },
  log: { op: 'log', records: [{ level: 'info', msg: 'hello from task', at: 3, worker: 'w-1', run: 7, task: 3, key: 'load' }] },
  error: { op: 'error', ref: -1, error: err },
};

function pair(opts: { maxFrameBytes?: number; receives?: Direction } = {}): { tx: FrameCodec; rx: FrameCodec } {
  return { tx: new FrameCodec(opts), rx: new FrameCodec(opts) };
}

describe('FrameCodec round trip', () => {
  it('has a sample for every op and a direction for each', () => {
    expect(Object.keys(samples).sort()).toEqual([...OPS].sort());
    for (const op of OPS) expect(directionsOf(op).length).toBeGreaterThan(0);
  });

  it('round-trips every op through a sender and a receiver codec', () => {
    const { tx, rx } = pair();
    for (const op of OPS) {
      const msg = samples[op];
      const out = rx.decode(tx.encode([msg]));
      expect(out).toEqual([msg]);
    }
  });

  it('round-trips every op in the direction(s) it is declared for, and rejects the others', () => {
    const dirs: Direction[] = ['c2s', 'w2s', 's2w', 's2c', 'w2w'];
    for (const dir of dirs) {
      const { tx, rx } = pair({ receives: dir });
      for (const op of OPS) {
        if (!directionsOf(op).includes(dir)) continue;
        expect(rx.decode(tx.encode([samples[op]]))).toEqual([samples[op]]);
      }
      for (const op of OPS) {
        if (directionsOf(op).includes(dir)) continue;
        const fresh = pair({ receives: dir });
        expect(() => fresh.rx.decode(fresh.tx.encode([samples[op]]))).toThrow(
          expect.objectContaining({ code: 'UNKNOWN_OP', detail: expect.objectContaining({ op }) }),
        );
      }
    }
  });

  it('carries a whole batch of mixed ops in one frame', () => {
    const { tx, rx } = pair();
    const batch = OPS.map((op) => samples[op]);
    expect(rx.decode(tx.encode(batch))).toEqual(batch);
  });

  it('negotiates record structures once: later frames with the same shapes are smaller and need the earlier ones', () => {
    const { tx, rx } = pair();
    const first = tx.encode([samples.outcomes]);
    const second = tx.encode([samples.outcomes]);
    expect(second.byteLength).toBeLessThan(first.byteLength);
    expect(rx.decode(first)).toEqual([samples.outcomes]);
    expect(rx.decode(second)).toEqual([samples.outcomes]);
    // A receiver that missed the first frame cannot read the second.
    const late = new FrameCodec();
    expect(() => late.decode(second)).toThrow(ProtocolError);
  });

  it('keeps decoding correctly past msgpackr’s record id space (ids are recycled in order)', () => {
    const { tx, rx } = pair();
    for (let i = 0; i < 200; i++) {
      const msg: Message = { op: 'log', records: [{ level: 'info', msg: `m${i}`, at: i, [`k${i}`]: i } as never] };
      expect(rx.decode(tx.encode([msg]))).toEqual([msg]);
    }
  });

  it('reset() on both ends starts a fresh negotiation (reconnect)', () => {
    const { tx, rx } = pair();
    rx.decode(tx.encode([samples.compute]));
    rx.decode(tx.encode([samples.compute]));
    // Reconnect: a fresh receiver on the other side, and a reset sender.
    tx.reset();
    const rx2 = new FrameCodec();
    expect(rx2.decode(tx.encode([samples.compute]))).toEqual([samples.compute]);
    expect(rx2.decode(tx.encode([samples.compute]))).toEqual([samples.compute]);
    // The old receiver, reset, reads the new stream too.
    rx.reset();
    tx.reset();
    expect(rx.decode(tx.encode([samples.compute]))).toEqual([samples.compute]);
  });

  it('returns frames that own their memory (safe to keep or transfer), never a view of msgpackr’s buffer', () => {
    const tx = new FrameCodec();
    const a = tx.encode([samples.heartbeat]);
    const b = tx.encode([samples.heartbeat]);
    for (const f of [a, b]) {
      expect(f.byteOffset).toBe(0);
      expect(f.buffer.byteLength).toBe(f.byteLength);
    }
    expect(a.buffer).not.toBe(b.buffer);
    // Transferring one detaches only its own memory.
    const copyOfB = Uint8Array.from(b);
    structuredClone(a, { transfer: [a.buffer as ArrayBuffer] });
    expect(a.byteLength).toBe(0);
    expect(b).toEqual(copyOfB);
  });

  it('decodes binary values as copies, not views of the received frame', () => {
    const { tx, rx } = pair();
    const frame = tx.encode([samples.data]);
    const [msg] = rx.decode(frame);
    const value = (msg as typeof samples.data).values[0] as Uint8Array;
    expect(value).toEqual(new Uint8Array([1, 2, 3]));
    expect(value.buffer).not.toBe(frame.buffer);
  });

  it('errors survive the wire and are rebuilt into their classes', () => {
    const { tx, rx } = pair();
    const sent: Message = { op: 'error', ref: 4, error: wireError(new TaskTimeoutError('took 5s')) };
    const [got] = rx.decode(tx.encode([sent]));
    const rebuilt = errorFromWire((got as typeof sent).error);
    expect(rebuilt).toBeInstanceOf(TaskTimeoutError);
    expect(rebuilt).toBeInstanceOf(WeftError);
    expect(rebuilt.message).toBe('took 5s');
    expect((rebuilt as WeftError).code).toBe('TASK_TIMEOUT');
    expect(rebuilt.stack).toContain('took 5s');
  });

  it('types messages by direction', () => {
    const fromWorker: WorkerToScheduler = samples.outcomes;
    const toClient: MessageTo<'s2c'> = samples.taskEvents;
    // @ts-expect-error compute travels scheduler → worker only
    const wrong: WorkerToScheduler = samples.compute;
    expect([fromWorker.op, toClient.op, wrong.op]).toEqual(['outcomes', 'taskEvents', 'compute']);
  });
});

describe('calls in columns', () => {
  const base = { taskKey: 'file:///t.ts#f', key: 'f', timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined };
  const calls: WireCall[] = [
    { ...base, id: 1, runId: 10, args: [1, 2] },
    { ...base, id: 2, runId: 11, args: [null, 'x'], deps: [{ key: '4:1', holders: [], nbytes: 9, arg: 0, index: -1 }] },
    {
      ...base,
      id: 3,
      runId: 12,
      taskKey: 'file:///t.ts#g',
      key: 'g',
      mapIndex: 4,
      attempt: 2,
      timeoutMs: 1500,
      args: [[null, null], null],
      deps: [
        { key: '4:1', holders: ['w1', 'w2'], nbytes: 100, arg: 0, index: 0 },
        { key: '4:2', holders: ['w2'], nbytes: 2 ** 40, arg: 0, index: 1, path: [3, 0] },
        { key: '4:3', holders: [], nbytes: 0, arg: 1, index: -1 },
      ],
      ret: true,
    },
    { ...base, id: 2 ** 40, runId: 13, args: [], loopCount: 2, loopResult: { n: 1 }, resources: { GPU: 1 } },
  ];

  it('round-trip through a codec: every field, inputs with their holders and paths, extras', () => {
    const { tx, rx } = pair({ receives: 's2w' });
    const cols = toColumns(calls);
    expect(cols.taskKeys).toEqual(['file:///t.ts#f', 'file:///t.ts#g']); // each key once
    const [m] = rx.decode(tx.encode([{ op: 'compute', run: 4, modules: [], bundle: '', calls: [], cols }]));
    expect(fromColumns((m as Extract<Message, { op: 'compute' }>).cols!)).toEqual(calls);
  });

  it('refuse columns that do not fit together, naming the column', () => {
    const good = toColumns(calls);
    const cases: [Partial<Record<keyof CallColumns, unknown>>, string][] = [
      [{ id: [1, 2, 'x', 4] }, '"id"'],
      [{ runId: [1, 2, 3] }, '"runId"'],
      [{ taskKey: new Int32Array([0, 0, 7, 0]) }, '"taskKey[2]"'],
      [{ args: [[], [], 5, []] }, '"args[2]"'],
      [{ ndeps: new Int32Array([0, 1, 9, 0]) }, '"ndeps[2]"'],
      [{ ndeps: new Int32Array([0, 1, 1, 0]) }, '"ndeps"'],
      [{ nholders: new Int32Array([0, 9, 1, 0]) }, '"nholders[1]"'],
      [{ nholders: new Int32Array([0, 1, 1, 0]) }, '"nholders"'],
      [{ depArg: new Int32Array(1) }, '"depArg"'],
      [{ depPaths: [{ d: 40, path: [] }] }, '"depPaths[].d"'],
      [{ extra: [{ i: -1 }] }, '"extra[].i"'],
    ];
    for (const [change, named] of cases) {
      const bad = { ...good, ...change } as unknown as CallColumns;
      expect(() => fromColumns(bad), named).toThrow(expect.objectContaining({ code: 'BAD_MESSAGE', message: expect.stringContaining(named) }));
    }
  });
});

describe('outcomes in columns', () => {
  const outs: WireOutcome[] = [
    { id: 1, runId: 11, status: 'ok', startMs: 1.5e12 + 0.25, endMs: 1.5e12 + 0.75, nbytes: 1, len: -1, value: null },
    { id: 2, runId: 12, status: 'ok', startMs: 3, endMs: 4, nbytes: 40_000, len: 3, inner: [1, 2, 0] },
    { id: 3, runId: 13, status: 'ok', startMs: 5, endMs: 6, nbytes: 0, len: -1, value: undefined },
    { id: 4, runId: 14, status: 'error', startMs: 7, endMs: 8, nbytes: 0, len: -1, error: wireError(new RangeError('no')) },
    { id: 2 ** 40, runId: 15, status: 'cancelled', startMs: 0, endMs: 9, nbytes: 0, len: -1 },
    { id: 6, runId: 16, status: 'timeout', startMs: 1, endMs: 2, nbytes: 0, len: -1 },
    { id: 7, runId: 17, status: 'lost', startMs: 0, endMs: 3, nbytes: 0, len: -1 },
    { id: 8, runId: 18, status: 'ok', startMs: 1, endMs: 2, nbytes: 12, len: 2, value: ['a', { b: 1 }] },
  ];

  it('round-trip through a codec: every field, an undefined inline value kept apart from no value', () => {
    const { tx, rx } = pair({ receives: 'w2s' });
    const [m] = rx.decode(tx.encode([{ op: 'outcomes', run: 3, outcomes: [], cols: outcomesToColumns(outs) }]));
    const back = outcomesOf(m as Extract<Message, { op: 'outcomes' }>);
    expect(back).toEqual(outs);
    expect('value' in back[2]!).toBe(true);
    expect('value' in back[1]!).toBe(false);
    expect(back[3]!.error).toMatchObject({ name: 'RangeError', message: 'no' });
  });

  it('round-trip a batch of a thousand, in order', () => {
    const many: WireOutcome[] = Array.from({ length: 1000 }, (_, i) => ({ id: i, runId: i, status: 'ok', startMs: 1.7e12 + i / 3, endMs: 1.7e12 + i / 2, nbytes: 1, len: -1, value: i }));
    const { tx, rx } = pair({ receives: 'w2s' });
    const [m] = rx.decode(tx.encode([{ op: 'outcomes', run: 1, outcomes: [], cols: outcomesToColumns(many) }]));
    expect(outcomesOf(m as Extract<Message, { op: 'outcomes' }>)).toEqual(many);
  });

  it('travel as typed arrays from TYPED_COLUMN_MIN outcomes on, as plain arrays below (a typed array costs about a µs to unpack)', () => {
    const mk = (n: number): WireOutcome[] => Array.from({ length: n }, (_, i) => ({ id: i, runId: i, status: 'ok', startMs: 1, endMs: 2, nbytes: 1, len: -1 }));
    const { tx, rx } = pair({ receives: 'w2s' });
    for (const n of [1, TYPED_COLUMN_MIN - 1, TYPED_COLUMN_MIN]) {
      const cols = outcomesToColumns(mk(n));
      expect(cols.startMs instanceof Float64Array).toBe(n >= TYPED_COLUMN_MIN);
      expect(Array.isArray(cols.status)).toBe(n < TYPED_COLUMN_MIN);
      const [m] = rx.decode(tx.encode([{ op: 'outcomes', run: 1, outcomes: [], cols }]));
      expect(outcomesOf(m as Extract<Message, { op: 'outcomes' }>)).toEqual(mk(n));
    }
  });

  it('refuse columns that do not fit together, naming the column', () => {
    const good = outcomesToColumns(outs);
    const cases: [Partial<Record<keyof OutcomeColumns, unknown>>, string][] = [
      [{ id: 'x' }, '"id"'],
      [{ runId: [1, 2] }, '"runId"'],
      [{ endMs: new Float64Array(2) }, '"endMs"'],
      [{ status: new Uint8Array(outs.length).fill(9) }, '"status[0]"'],
      [{ hasValue: new Uint8Array(outs.length) }, '"values"'],
      [{ values: [1, 2, 3, 4, 5, 6] }, '"values"'],
      [{ extra: [{ i: 99 }] }, '"extra[].i"'],
      [{ extra: [{ i: 0, inner: 'x' }] }, '"extra[].inner"'],
    ];
    for (const [change, named] of cases) {
      const bad = { ...good, ...change } as unknown as OutcomeColumns;
      expect(() => outcomesFromColumns(bad), named).toThrow(expect.objectContaining({ code: 'BAD_MESSAGE', message: expect.stringContaining(named) }));
    }
  });
});

describe('dispatch', () => {
  it('hands each message to its op handler, in order, and refuses ops without one', () => {
    const seen: string[] = [];
    const handlers: Handlers<'w2s'> = {
      hello: (m) => seen.push(`hello ${m.name}`),
      proof: () => seen.push('proof'),
      outcomes: (m) => seen.push(`outcomes ${m.outcomes.length}`),
      credits: (m) => seen.push(`credits ${m.credits}`),
      whoHas: () => seen.push('whoHas'),
      getBundle: () => seen.push('getBundle'),
      data: () => seen.push('data'),
      getData: () => seen.push('getData'),
      acquired: () => seen.push('acquired'),
      stealReply: () => seen.push('stealReply'),
      heartbeat: () => seen.push('heartbeat'),
      retire: () => seen.push('retire'),
      log: () => seen.push('log'),
      error: () => seen.push('error'),
    };
    const { tx, rx } = pair();
    dispatch(handlers, rx.decode(tx.encode([samples.hello, samples.outcomes, samples.credits])));
    expect(seen).toEqual(['hello w-1', 'outcomes 2', 'credits 8']);
    expect(() => dispatch(handlers, [samples.compute])).toThrow(expect.objectContaining({ code: 'UNKNOWN_OP' }));
  });
});

describe('graph nodes as data', () => {
  const base: Omit<NodeSpec, 'kind' | 'options'> = {
    id: 0,
    key: 'k',
    taskKey: '',
    module: '',
    args: [{ kind: 'ref', node: 1, mode: 'plain' }],
    upstream: [],
    mapped: false,
  };

  it('sends an inline node as its InlineOp and rebuilds the function on the other side', () => {
    const node: NodeSpec = {
      ...base,
      kind: 'inline',
      options: taskOptions({ name: 'case(x)' }),
      inline: inlineFn({ op: 'equals', value: 3, name: 'case(x)' }),
    };
    const wire = toWireNode(node);
    expect(wire.inlineOp).toEqual({ op: 'equals', value: 3, name: 'case(x)' });
    const { tx, rx } = pair();
    const [got] = rx.decode(tx.encode([{ op: 'graphNodes', graph: 1, offset: 0, nodes: [wire] }]));
    const back = fromWireNode((got as GraphNodesMsg).nodes[0] as WireNode);
    expect(back.inline?.(3)).toBe(3);
    expect(() => back.inline?.(4)).toThrow(SkipSignal);
    expect(inlineOpOf(back.inline)).toEqual(wire.inlineOp);
    expect(back.options.stateHandlers).toEqual([]);
    expect(back.options.trigger).toEqual(node.options.trigger);
  });

  it('refuses functions that cannot travel, naming the task', () => {
    const custom: NodeSpec = {
      ...base,
      kind: 'task',
      options: taskOptions({ name: 'k', trigger: { kind: 'custom', name: 'mine', fn: () => true } }),
    };
    expect(() => toWireNode(custom)).toThrow(/task "k": custom trigger "mine"/);
    const validator: NodeSpec = { ...base, kind: 'task', options: taskOptions({ name: 'k', cacheValidator: () => true }) };
    expect(() => toWireNode(validator)).toThrow(/cache validator/);
    const handlers: NodeSpec = { ...base, kind: 'task', options: taskOptions({ name: 'k', stateHandlers: [() => {}] }) };
    expect(toWireNode(handlers).options.stateHandlers).toBe(1);
  });
});

describe('FrameCodec rejects bad input', () => {
  const codeOf = (fn: () => unknown): string => {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(ProtocolError);
      expect(e).toBeInstanceOf(WeftError);
      return (e as ProtocolError).code;
    }
    throw new Error('did not throw');
  };
  const raw = (v: unknown): Uint8Array => new Packr({ useRecords: false }).pack(v);

  it('garbage bytes', () => {
    expect(codeOf(() => new FrameCodec().decode(new Uint8Array([0xc1, 0xff, 0x00, 0x13])))).toBe('MALFORMED_FRAME');
    expect(codeOf(() => new FrameCodec().decode(new Uint8Array(0)))).toBe('MALFORMED_FRAME');
  });

  it('a truncated msgpack body', () => {
    const { tx, rx } = pair();
    const frame = tx.encode([samples.compute, samples.heartbeat]);
    expect(codeOf(() => rx.decode(frame.subarray(0, frame.byteLength - 3)))).toBe('MALFORMED_FRAME');
    for (const cut of [1, 5, 20]) expect(codeOf(() => new FrameCodec().decode(frame.subarray(0, cut)))).toBe('MALFORMED_FRAME');
  });

  it('a length header that promises more than the frame holds, without allocating it', () => {
    expect(codeOf(() => new FrameCodec().decode(new Uint8Array([0xdd, 0xff, 0xff, 0xff, 0xff, 0x90])))).toBe('MALFORMED_FRAME');
    expect(codeOf(() => new FrameCodec().decode(new Uint8Array([0x91, 0xdf, 0xff, 0xff, 0xff, 0xff])))).toBe('MALFORMED_FRAME');
  });

  it('trailing bytes after the array', () => {
    const f = raw([{ op: 'graphEnd', graph: 1 }]);
    const withTail = new Uint8Array(f.byteLength + 1);
    withTail.set(f);
    expect(codeOf(() => new FrameCodec().decode(withTail))).toBe('MALFORMED_FRAME');
  });

  it('a top level that is not an array', () => {
    expect(codeOf(() => new FrameCodec().decode(raw({ op: 'heartbeat', at: 1 })))).toBe('MALFORMED_FRAME');
    expect(codeOf(() => new FrameCodec().decode(raw(42)))).toBe('MALFORMED_FRAME');
  });

  it('an element that is not an object, or has no string op', () => {
    expect(codeOf(() => new FrameCodec().decode(raw([1])))).toBe('BAD_MESSAGE');
    expect(codeOf(() => new FrameCodec().decode(raw([[]])))).toBe('BAD_MESSAGE');
    expect(codeOf(() => new FrameCodec().decode(raw([{ at: 1 }])))).toBe('BAD_MESSAGE');
    expect(codeOf(() => new FrameCodec().decode(raw([{ op: 3 }])))).toBe('BAD_MESSAGE');
  });

  it('an unknown op, named in the error', () => {
    expect(() => new FrameCodec().decode(raw([{ op: 'rm -rf' }]))).toThrow(
      expect.objectContaining({ code: 'UNKNOWN_OP', message: expect.stringContaining('"rm -rf"') }),
    );
    // Inherited names are not ops.
    expect(codeOf(() => new FrameCodec().decode(raw([{ op: 'toString' }])))).toBe('UNKNOWN_OP');
    expect(codeOf(() => new FrameCodec().decode(raw([{ op: '__proto__' }])))).toBe('UNKNOWN_OP');
  });

  it('a missing field, naming op, field and expected type', () => {
    expect(() => new FrameCodec().decode(raw([{ op: 'compute', run: 1, modules: [], bundle: '' }]))).toThrow(
      expect.objectContaining({
        code: 'BAD_MESSAGE',
        detail: { op: 'compute', field: 'calls', expected: 'array' },
        message: expect.stringMatching(/op "compute".*missing field "calls" \(array\)/),
      }),
    );
  });

  it('mistyped fields', () => {
    const cases: [unknown, string, string][] = [
      [{ ...samples.hello, version: '1' }, 'version', 'int'],
      [{ ...samples.hello, threads: 1.5 }, 'threads', 'int'],
      [{ ...samples.challenge, nonce: 'abc' }, 'nonce', 'bytes'],
      [{ ...samples.graphNodes, nodes: {} }, 'nodes', 'array'],
      [{ ...samples.graphBegin, parameters: [1] }, 'parameters', 'object'],
      [{ ...samples.error, error: { message: 'x' } }, 'error', 'error'],
      [{ ...samples.heartbeat, metrics: 5 }, 'metrics', 'object'],
      [{ ...samples.runState, flowState: 3 }, 'flowState', 'string'],
    ];
    for (const [msg, field, expected] of cases) {
      expect(() => new FrameCodec().decode(raw([samples.graphEnd, msg]))).toThrow(
        expect.objectContaining({ code: 'BAD_MESSAGE', detail: expect.objectContaining({ field, expected }) }),
      );
    }
    // Optional fields may be absent.
    const { metrics: _m, ...bare } = samples.heartbeat;
    expect(new FrameCodec().decode(raw([bare]))).toEqual([bare]);
  });

  it('an oversize frame, rejected by size before any decoding', () => {
    const rx = new FrameCodec({ maxFrameBytes: 1024 });
    // Garbage that would fail to decode: the size check must come first.
    const big = new Uint8Array(1025).fill(0xc1);
    expect(() => rx.decode(big)).toThrow(expect.objectContaining({ code: 'FRAME_TOO_LARGE', detail: { bytes: 1025 } }));
    expect(new FrameCodec({ maxFrameBytes: 64 }).maxFrameBytes).toBe(64);
    expect(new FrameCodec().maxFrameBytes).toBe(64 * 1024 * 1024);
  });

  it('refuses to encode a frame the peer would reject', () => {
    const tx = new FrameCodec({ maxFrameBytes: 256 });
    expect(() => tx.encode([{ op: 'retire', reason: 'x'.repeat(300) }])).toThrow(
      expect.objectContaining({ code: 'FRAME_TOO_LARGE' }),
    );
  });

  it('is broken after a failure until reset (its structures may no longer match the peer’s)', () => {
    const { tx, rx } = pair();
    expect(() => rx.decode(new Uint8Array([0xc1]))).toThrow(ProtocolError);
    expect(codeOf(() => rx.decode(tx.encode([samples.graphEnd])))).toBe('CODEC_BROKEN');
    rx.reset();
    tx.reset();
    expect(rx.decode(tx.encode([samples.graphEnd]))).toEqual([samples.graphEnd]);
    const small = new FrameCodec({ maxFrameBytes: 64 });
    expect(() => small.encode([{ op: 'retire', reason: 'x'.repeat(100) }])).toThrow(ProtocolError);
    expect(codeOf(() => small.encode([samples.graphEnd]))).toBe('CODEC_BROKEN');
  });

  it('checks the protocol version of a hello', () => {
    expect(() => checkVersion(samples.hello)).not.toThrow();
    expect(() => checkVersion({ ...samples.hello, version: PROTOCOL_VERSION + 1 })).toThrow(
      expect.objectContaining({ code: 'VERSION_MISMATCH', message: expect.stringContaining('worker "w-1"') }),
    );
  });
});

describe('Batcher', () => {
  function harness(opts: { flushBytes?: number; maxQueuedBytes?: number } = {}) {
    const tx = new FrameCodec();
    const rx = new FrameCodec();
    const frames: Message[][] = [];
    const errors: unknown[] = [];
    let drains = 0;
    const b = new Batcher(tx, (f) => frames.push(rx.decode(f)), {
      ...opts,
      onError: (e) => errors.push(e),
      onDrain: () => drains++,
    });
    return { b, frames, errors, drains: () => drains };
  }
  const hb = (at: number): Message => ({ op: 'heartbeat', at });

  it('sends everything pushed in one tick as one frame, in order', async () => {
    const { b, frames } = harness();
    for (let i = 0; i < 5; i++) expect(b.push(hb(i))).toBe(true);
    expect(frames).toHaveLength(0);
    await tick();
    expect(frames).toEqual([[hb(0), hb(1), hb(2), hb(3), hb(4)]]);
    b.push(hb(5));
    await tick();
    expect(frames).toHaveLength(2);
    await tick();
    expect(frames).toHaveLength(2);
  });

  it('flushes at once when the queued estimate reaches the threshold', () => {
    const { b, frames } = harness({ flushBytes: 100 });
    const big: Message = { op: 'retire', reason: 'x'.repeat(60) };
    b.push(hb(1));
    expect(frames).toHaveLength(0);
    b.push(big);
    expect(frames).toEqual([[hb(1), big]]);
    expect(b.queuedBytes).toBe(0);
  });

  it('uses a size hint when given', () => {
    const { b, frames } = harness({ flushBytes: 1000 });
    b.push(hb(1), 999);
    expect(frames).toHaveLength(0);
    b.push(hb(2), 1);
    expect(frames).toHaveLength(1);
  });

  it('holds frames while paused and sends them on resume, in frames of about flushBytes', async () => {
    const { b, frames } = harness({ flushBytes: 200, maxQueuedBytes: 10_000 });
    b.pause();
    const msgs = Array.from({ length: 20 }, (_, i): Message => ({ op: 'retire', reason: `${i}`.padEnd(30, '.') }));
    for (const m of msgs) expect(b.push(m)).toBe(true);
    await tick();
    expect(frames).toHaveLength(0);
    b.resume();
    expect(frames.length).toBeGreaterThan(1);
    expect(frames.flat()).toEqual(msgs);
    expect(b.length).toBe(0);
  });

  it('stops mid-flush when send pauses it (socket over its high-water mark)', () => {
    const tx = new FrameCodec();
    const sent: Uint8Array[] = [];
    const b: Batcher = new Batcher(
      tx,
      (f) => {
        sent.push(f);
        b.pause();
      },
      { flushBytes: 50, onError: (e) => { throw e; } },
    );
    b.pause();
    for (let i = 0; i < 10; i++) b.push({ op: 'retire', reason: 'y'.repeat(40) });
    b.resume();
    expect(sent).toHaveLength(1);
    expect(b.length).toBe(9);
    b.resume();
    expect(sent).toHaveLength(2);
  });

  it('bounds the queue while paused: push returns false without queueing, then onDrain after resume', async () => {
    const h = harness({ flushBytes: 1_000_000, maxQueuedBytes: 500 });
    h.b.pause();
    let accepted = 0;
    for (let i = 0; i < 100; i++) if (h.b.push({ op: 'retire', reason: 'z'.repeat(40) })) accepted++;
    expect(accepted).toBeGreaterThan(0);
    expect(accepted).toBeLessThan(100);
    expect(h.b.queuedBytes).toBeLessThanOrEqual(500);
    expect(h.b.length).toBe(accepted);
    expect(h.drains()).toBe(0);
    h.b.resume();
    expect(h.frames.flat()).toHaveLength(accepted);
    expect(h.drains()).toBe(1);
    expect(h.b.push(hb(1))).toBe(true);
    await tick();
    expect(h.frames.flat()).toHaveLength(accepted + 1);
  });

  it('reports an encoding failure through onError and refuses further pushes', async () => {
    const tx = new FrameCodec({ maxFrameBytes: 64 });
    const errors: unknown[] = [];
    const b = new Batcher(tx, () => {}, { onError: (e) => errors.push(e) });
    b.push({ op: 'retire', reason: 'w'.repeat(100) });
    await tick();
    expect(errors).toEqual([expect.objectContaining({ code: 'FRAME_TOO_LARGE' })]);
    expect(b.push(hb(1))).toBe(false);
  });
});

describe('protocol errors across a hop', () => {
  it('a serialized ProtocolError is rebuilt as a ProtocolError with its code', () => {
    const rec = serializeError(new ProtocolError('UNKNOWN_OP', 'unknown op "nope"', { op: 'nope' }));
    const back = deserializeError(rec);
    expect(back).toBeInstanceOf(ProtocolError);
    expect(back).toBeInstanceOf(WeftError);
    expect((back as ProtocolError).code).toBe('UNKNOWN_OP');
    expect(back.message).toBe('unknown op "nope"');
  });
});

describe('GraphEncoder / GraphDecoder', () => {
  it('sends each options object and string once and rebuilds the same nodes', () => {
    const shared = taskOptions({ name: 'leaf', maxRetries: 2, tags: ['io'] });
    const sum = taskOptions({ name: 'sum' });
    const nodes: NodeSpec[] = [];
    for (let i = 0; i < 6; i++) {
      nodes.push({ id: i, key: `leaf-${i}`, kind: 'task', taskKey: 'file:///t.ts#leaf', module: 'file:///t.ts', args: [{ kind: 'const', value: i, mode: 'plain' }], upstream: [], mapped: false, options: shared });
    }
    nodes.push({ id: 6, key: 'sum', kind: 'task', taskKey: 'file:///t.ts#sum', module: 'file:///t.ts', args: [0, 1, 2, 3, 4, 5].map((n) => ({ kind: 'ref', node: n, mode: 'plain' }) as const), upstream: [], mapped: false, options: sum });
    const enc = new GraphEncoder();
    const dec = new GraphDecoder();
    const { tx, rx } = pair();
    const first = enc.chunk(9, nodes, 0, 4);
    const second = enc.chunk(9, nodes, 4, 7);
    expect(first.options).toHaveLength(1);
    expect(first.strings).toEqual(['file:///t.ts#leaf', 'file:///t.ts']);
    expect(second.options).toHaveLength(1); // only "sum" is new
    expect(second.strings).toEqual(['file:///t.ts#sum']);
    const back: NodeSpec[] = [];
    for (const m of rx.decode(tx.encode([first, second]))) back.push(...dec.nodes(m as GraphNodesMsg));
    expect(back.map((n) => [n.id, n.key, n.taskKey, n.module, n.options.name, n.options.maxRetries])).toEqual(
      nodes.map((n) => [n.id, n.key, n.taskKey, n.module, n.options.name, n.options.maxRetries]),
    );
    expect(back[6]!.args).toEqual(nodes[6]!.args);
    // Nodes that shared an options object share it again (the runner relies on that for speed).
    expect(back[0]!.options).toBe(back[5]!.options);
  });

  it('rebuilds every field from its columns: bindings of each mode, constants, upstream lists, parameter and inline nodes', () => {
    const opts = taskOptions({ name: 'x' });
    const nodes: NodeSpec[] = [
      { id: 0, key: 'n', kind: 'parameter', taskKey: '', module: '', args: [], upstream: [], mapped: false, options: opts, parameter: { name: 'n', default: 3, required: false, type: 'number' } },
      { id: 1, key: 'xs', kind: 'task', taskKey: 'file:///t.ts#xs', module: 'file:///t.ts', args: [{ kind: 'ref', node: 0, mode: 'plain' }, { kind: 'const', value: { big: [1, 2] }, mode: 'unmapped' }], upstream: [0], mapped: false, options: opts },
      { id: 2, key: 'sq', kind: 'task', taskKey: 'file:///t.ts#sq', module: 'file:///t.ts', args: [{ kind: 'ref', node: 1, mode: 'mapped' }, { kind: 'const', value: null, mode: 'plain' }], upstream: [], mapped: true, options: opts },
      { id: 3, key: 'flat', kind: 'task', taskKey: 'file:///t.ts#xs', module: 'file:///t.ts', args: [{ kind: 'ref', node: 2, mode: 'flatten' }], upstream: [1, 2], mapped: true, options: opts },
      { id: 4, key: 'case(x)', kind: 'inline', taskKey: '', module: '', args: [{ kind: 'ref', node: 0, mode: 'plain' }], upstream: [], mapped: false, options: opts, inline: inlineFn({ op: 'equals', value: 3, name: 'case(x)' }) },
    ];
    const { tx, rx } = pair({ receives: 'c2s' });
    const [m] = rx.decode(tx.encode([new GraphEncoder().chunk(2, nodes, 0, nodes.length)]));
    expect((m as GraphNodesMsg).nodes).toEqual([]);
    const back = new GraphDecoder().nodes(m as GraphNodesMsg);
    const plain = (n: NodeSpec): unknown => ({ ...n, options: n.options.name, inline: n.inline === undefined ? undefined : inlineOpOf(n.inline) });
    expect(back.map(plain)).toEqual(nodes.map(plain));
    expect(back[4]!.inline?.(3)).toBe(3);
  });

  it('refuses node columns that do not fit together, naming the column', () => {
    const nodes: NodeSpec[] = [
      { id: 0, key: 'a', kind: 'task', taskKey: 'file:///t.ts#a', module: 'file:///t.ts', args: [{ kind: 'const', value: 1, mode: 'plain' }], upstream: [], mapped: false, options: taskOptions({ name: 'a' }) },
      { id: 1, key: 'b', kind: 'task', taskKey: 'file:///t.ts#a', module: 'file:///t.ts', args: [{ kind: 'ref', node: 0, mode: 'plain' }], upstream: [0], mapped: false, options: taskOptions({ name: 'a' }) },
    ];
    const good = new GraphEncoder().chunk(1, nodes, 0, 2);
    const cols = good.cols!;
    const cases: [Partial<Record<keyof NodeColumns, unknown>>, string][] = [
      [{ key: 'ab' }, '"key"'],
      [{ kind: new Uint8Array([0, 7]) }, '"kind[1]"'],
      [{ t: [0, 'x'] }, '"t"'],
      [{ argNode: new BigInt64Array(1) }, '"argNode"'],
      [{ nargs: new Int32Array([1, 5]) }, '"nargs[1]"'],
      [{ nargs: new Int32Array([0, 1]) }, '"nargs"'],
      [{ argMode: new Uint8Array([0, 9]) }, '"argMode[1]"'],
      [{ consts: [] }, '"consts"'],
      [{ nup: new Int32Array([0, 2]) }, '"nup[1]"'],
      [{ up: new Float64Array([0, 1]) }, '"nup"'],
      [{ extra: [{ i: 5 }] }, '"extra[].i"'],
    ];
    for (const [change, named] of cases) {
      const msg = { ...good, cols: { ...cols, ...change } } as unknown as GraphNodesMsg;
      expect(() => new GraphDecoder().nodes(msg), named).toThrow(expect.objectContaining({ code: 'BAD_MESSAGE', message: expect.stringContaining(named) }));
    }
  });

  it('refuses a node that points outside the tables', () => {
    const dec = new GraphDecoder();
    const bad = { op: 'graphNodes', graph: 1, offset: 0, nodes: [{ key: 'a', kind: 'task', t: 0, m: 0, o: 3, args: [], upstream: [], mapped: false }] } as unknown as GraphNodesMsg;
    expect(() => dec.nodes(bad)).toThrow(expect.objectContaining({ code: 'BAD_MESSAGE' }));
  });
});
