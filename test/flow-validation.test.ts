import { describe, expect, it } from 'vitest';
import { Flow, flatten, flow, parameter, task, triggers, unmapped } from '../src/flow/index.ts';
import { FlowValidationError } from '../src/errors.ts';

const inc = task(function inc(x: number): number {
  return x + 1;
});
const add = task(function add(a: number, b: number): number {
  return a + b;
});

/** The FlowValidationError that `fn` throws. */
function validationError(fn: () => unknown): FlowValidationError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(FlowValidationError);
    return e as FlowValidationError;
  }
  throw new Error('expected a FlowValidationError');
}

describe('task option validation (at definition)', () => {
  const cases: [string, Record<string, unknown>, string][] = [
    ['negative retries', { maxRetries: -1 }, 'task "t": option maxRetries: must be a non-negative integer, got -1'],
    ['fractional retries', { maxRetries: 1.5 }, 'task "t": option maxRetries: must be a non-negative integer, got 1.5'],
    ['bad duration string', { retryDelay: '5 parsecs' }, `task "t": option retryDelay: bad duration "5 parsecs" (use ms as a number, or a string like '200ms', '5s', '1m', '2h')`],
    ['negative timeout', { timeout: -5 }, 'task "t": option timeout: expected a non-negative number of ms, got -5'],
    ['NaN cacheFor', { cacheFor: Number.NaN }, 'task "t": option cacheFor: expected a non-negative number of ms, got NaN'],
    ['unknown trigger', { trigger: 'sometimes' }, 'task "t": option trigger: unknown trigger "sometimes"'],
    ['uncalled trigger factory', { trigger: triggers.someSuccessful }, 'task "t": option trigger: call triggers.someSuccessful({ atLeast, atMost }) instead of passing it uncalled'],
    ['bad retryOn', { retryOn: [42] }, 'task "t": option retryOn: expected error classes or error names, got 42'],
    ['bad cacheValidator', { cacheValidator: 'sometimes' }, 'task "t": option cacheValidator: unknown validator "sometimes"'],
    ['bad priority', { priority: Infinity }, 'task "t": option priority: expected a finite number, got Infinity'],
    ['bad resources', { resources: { GPU: -1 } }, 'task "t": option resources.GPU: expected a non-negative number, got -1'],
    ['bad tags', { tags: 'io' }, 'task "t": option tags: expected an array of strings'],
    ['bad serializer', { result: { serializer: 'xml' } }, `task "t": option result.serializer: expected 'json' or 'msgpack', got "xml"`],
    ['empty target', { target: '' }, 'task "t": option target: expected a non-empty string'],
    ['unknown option', { maxRetry: 3 }, 'task "t": unknown option "maxRetry"'],
  ];
  for (const [what, opts, message] of cases) {
    it(what, () => {
      const e = validationError(() => task({ name: 't', ...opts } as never, () => 1));
      expect(e.message).toContain(message);
      expect(e.task).toBe('t');
      expect(e.code).toBe('FLOW_INVALID');
    });
  }

  it('names an unnamed task by its ordinal', () => {
    expect(validationError(() => task({ maxRetries: -2 }, () => 1)).message).toMatch(/^task "@\d+": option maxRetries/);
  });

  it('per-use overrides are validated too', () => {
    expect(validationError(() => inc.with({ maxRetries: -1 })).message).toBe('task "inc": option maxRetries: must be a non-negative integer, got -1');
  });

  it('trigger bounds', () => {
    expect(validationError(() => triggers.someFailed({ atLeast: 3, atMost: 1 })).message).toBe('triggers.someFailed: atLeast (3) is greater than atMost (1)');
    expect(validationError(() => triggers.someSuccessful({ atLeast: -1 })).message).toBe('triggers.someSuccessful: atLeast must be a non-negative integer, got -1');
  });

  it('task() without a function', () => {
    expect(() => task({ name: 'x' } as never)).toThrow(TypeError);
  });
});

describe('flow validation (flow.spec())', () => {
  it('a cycle built with the imperative API names its tasks in order', () => {
    const f = new Flow('cyc');
    const a = f.add(inc, [1]);
    const b = f.add(inc, [a]);
    const c = f.add(inc, [b]);
    f.setDependencies(a, { upstream: [c] });
    const e = validationError(() => f.spec());
    expect(e.message).toBe('flow "cyc" has a cycle: "inc" -> "inc-2" -> "inc-3" -> "inc"');
    expect(e.task).toBe('inc');
  });

  it('a self-dependency is a cycle', () => {
    const f = new Flow('self');
    const a = f.add(inc, [1]);
    a.after(a);
    expect(validationError(() => f.spec()).message).toBe('flow "self" has a cycle: "inc" -> "inc"');
  });

  it('a ref from another flow', () => {
    const other = flow('other', () => inc(1));
    const f = flow('mine', () => {
      add(other.outputs, 2);
    });
    const e = validationError(() => f.spec());
    expect(e.message).toBe('task "add": argument 0 "inc" is a ref from another flow ("other")');
    expect(e.task).toBe('add');
  });

  it('an ordering edge to a ref from another flow', () => {
    const other = flow('other2', () => inc(1));
    const f = new Flow('mine2');
    const a = f.add(inc, [1]);
    f.setDependencies(a, { upstream: [other.outputs] });
    expect(validationError(() => f.spec()).message).toBe('task "inc": upstream "inc" is a ref from another flow ("other2")');
  });

  it('a dependency on a missing node', () => {
    const f = new Flow('missing');
    const a = f.add(inc, [1]);
    f.setDependencies(a, { upstream: [7] });
    expect(validationError(() => f.spec()).message).toBe('task "inc": depends on node 7, which is not in flow "missing"');
  });

  it('a duplicate explicit key', () => {
    const f = flow('dup', () => {
      inc.with({ name: 'step' })(1);
      add.with({ name: 'step' })(1, 2);
    });
    const e = validationError(() => f.spec());
    expect(e.message).toBe('task "step": duplicate key in flow "dup" (already used by task 0); give this use another name');
    expect(e.task).toBe('step');
  });

  it('a duplicate parameter, or a parameter clashing with a task key', () => {
    const f = flow('dup-param', () => {
      inc(parameter('x', 1));
      parameter('x', 2);
    });
    expect(validationError(() => f.spec()).message).toBe('parameter "x": duplicate key in flow "dup-param" (already used by parameter 0); give this use another name');
    const g = flow('param-clash', () => {
      inc(1);
      parameter('inc', 2);
    });
    expect(validationError(() => g.spec()).message).toMatch(/^parameter "inc": duplicate key/);
  });

  it('a parameter default of the wrong type', () => {
    const f = flow('ptype', () => {
      parameter('n', 'three', { type: 'number' });
    });
    expect(validationError(() => f.spec()).message).toBe('parameter "n": default "three" is not of type number');
  });

  it('a mapped binding on a non-list constant', () => {
    const f = flow('map-const', () => {
      add.map([1, 2], 3 as unknown as number[]);
    });
    const e = validationError(() => f.spec());
    expect(e.message).toBe('task "add": mapped argument 1 is not a list (got number 3); wrap it in unmapped() to pass it whole');
  });

  it('flatten of a constant that is not a list of lists', () => {
    const f = flow('flat-const', () => {
      inc.map(flatten([1, 2] as unknown as number[][]));
    });
    expect(validationError(() => f.spec()).message).toBe('task "inc": flattened argument 0 is not a list of lists (got an array)');
  });

  it('.map() with nothing to map over', () => {
    const f = flow('all-unmapped', () => {
      add.map(unmapped(1), unmapped(2));
    });
    expect(validationError(() => f.spec()).message).toBe('task "add": .map() needs at least one argument to map over (all are unmapped)');
  });

  it('counts further problems', () => {
    const f = flow('many', () => {
      add.map(1 as never, 2 as never);
    });
    expect(validationError(() => f.spec()).message).toBe(
      'task "add": mapped argument 0 is not a list (got number 1); wrap it in unmapped() to pass it whole (and 1 more problem in flow "many")',
    );
  });

  it('a reference task from another flow', () => {
    const other = flow('o3', () => inc(1));
    const f = flow('rt', () => inc(1), { referenceTasks: [other.outputs] });
    expect(validationError(() => f.spec()).message).toBe('flow "rt": reference task "inc" is a ref from another flow ("o3")');
  });

  it('run() rejects with the validation error', async () => {
    const f = new Flow('bad-run');
    const a = f.add(inc, [1]);
    a.after(a);
    await expect(f.run()).rejects.toBeInstanceOf(FlowValidationError);
  });

  it('building a flow inside another flow builder is an error', () => {
    expect(() =>
      flow('outer', () => {
        flow('inner', () => inc(1));
      }),
    ).toThrow('flow "inner" is being built inside the builder of flow "outer"; flows cannot nest (build it outside, or use tasks directly)');
  });

  it('parameter() and conditionals outside a builder', () => {
    expect(() => parameter('x')).toThrow('parameter("x") called outside a flow builder');
  });
});
