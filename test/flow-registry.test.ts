import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { flow, getTask, task } from '../src/flow/index.ts';
import { toModuleUrl } from '../src/flow/module-url.ts';
import * as fx from './fixtures/flow-tasks.ts';

const FIXTURE = pathToFileURL(new URL('./fixtures/flow-tasks.ts', import.meta.url).pathname).href;

describe('task registry keys', () => {
  it('detects the defining module from the stack (tsx/vitest show .ts paths)', () => {
    expect(fx.add.module).toBe(FIXTURE);
    expect(fx.add.key).toBe(`${FIXTURE}#add`);
    expect(fx.add.name).toBe('add');
  });

  it('an unnamed task gets its ordinal in the module', () => {
    expect(fx.anon.key).toBe(`${FIXTURE}#@2`);
    expect(fx.anon.name).toBe('@2');
  });

  it('a second definition with the same name gets name~2', () => {
    expect(fx.add2.key).toBe(`${FIXTURE}#add~2`);
    expect(fx.add2.name).toBe('add');
    expect(getTask(fx.add.key)?.fn).toBe(fx.add.fn);
    expect(getTask(fx.add2.key)?.fn).toBe(fx.add2.fn);
  });

  it('registers every definition with its resolved options', () => {
    const def = getTask(fx.explicit.key);
    expect(def).toBeDefined();
    expect(def).toMatchObject({ key: `${FIXTURE}#load`, name: 'load', module: FIXTURE, closure: false });
    expect(def!.options).toMatchObject({ maxRetries: 2, retryDelayMs: 5000 });
    expect(fx.explicit.def).toBe(def);
  });

  it('the module option overrides detection (paths become file URLs)', () => {
    expect(fx.moduleOverride.module).toBe('file:///elsewhere/tasks.ts');
    expect(fx.moduleOverride.key).toBe('file:///elsewhere/tasks.ts#over');
    const t = task({ name: 'u', module: 'file:///x/y.ts?v=3' }, () => 1);
    expect(t.key).toBe('file:///x/y.ts#u');
  });

  it('a task defined inside a flow builder is a closure with a unique key', () => {
    const keys: string[] = [];
    const make = (): void => {
      flow('closures', () => {
        const local = task(function local(x: number) {
          return x;
        });
        keys.push(local.key);
        expect(local.closure).toBe(true);
        expect(getTask(local.key)?.closure).toBe(true);
        local(1);
      });
    };
    make();
    make();
    expect(keys[0]).not.toBe(keys[1]);
    expect(keys[0]).toMatch(/^file:\/\/.*flow-registry\.test\.ts#local~closure\d+$/);
  });

  it('closures do not shift the ordinals of top-level tasks', () => {
    const before = task(() => 1);
    flow('c', () => {
      task(() => 2)();
    });
    const after = task(() => 3);
    const n = (k: string): number => Number(/#@(\d+)$/.exec(k)?.[1]);
    expect(n(after.key)).toBe(n(before.key) + 1);
  });

  it('a top-level task is not a closure', () => {
    expect(fx.add.closure).toBe(false);
  });

  it('calling a task outside a builder throws; .fn calls the function', () => {
    expect(() => fx.add(1, 2)).toThrow('task "add" called outside a flow builder; use task.fn(...) to call it directly');
    expect(() => fx.add.map([1], [2])).toThrow(/outside a flow builder/);
    expect(fx.add.fn(1, 2)).toBe(3);
    expect(fx.add2.fn(1, 2)).toBe(1003);
  });
});

describe('module URLs from stack frames', () => {
  it('keeps file URLs, converts paths, drops queries and hashes, ignores non-files', () => {
    expect(toModuleUrl('file:///a/b/flow.ts')).toBe('file:///a/b/flow.ts');
    expect(toModuleUrl('file:///a/b/flow.ts?t=123')).toBe('file:///a/b/flow.ts');
    expect(toModuleUrl('/a/b c/flow.ts')).toBe('file:///a/b%20c/flow.ts');
    expect(toModuleUrl('/a/b/flow.ts#x')).toBe('file:///a/b/flow.ts');
    expect(toModuleUrl('node:internal/modules/run_main')).toBe('');
    expect(toModuleUrl('<anonymous>')).toBe('');
    expect(toModuleUrl('C:\\work\\flow.ts')).toMatch(/^file:\/\/.*flow\.ts$/);
  });
});
