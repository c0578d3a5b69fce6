/**
 * Conditional flow (Prefect 1's `prefect.tasks.control_flow`): `caseOf`, `merge`,
 * `ifElse`, `switchOn`.
 *
 * As in Prefect, a branch is chosen by skipping the others: an inline *compare* node
 * takes the condition and throws `SkipSignal` when it does not match; the branch's tasks
 * depend on it through an ordering edge, so they skip too (skip propagation, as long as
 * `skipOnUpstreamSkip` is left on). `merge` then picks the result of the branch that ran.
 *
 * The compare and merge nodes are `kind: 'inline'`: the runner calls their `inline`
 * function in the main thread with the resolved arguments; a thrown `SkipSignal` means
 * state Skipped. Each inline function carries its data descriptor (`inlineOpOf`, in
 * inline.ts) so that a spec can cross a process boundary. Merge, as Prefect's, returns
 * the first upstream result that is not undefined/null: a skipped upstream has no result
 * (unless its skip carried data).
 */
import { requireBuilder, type GraphBuilder } from './builder.ts';
import { inlineFn, label, type InlineOp } from './inline.ts';
import { defaultOptions } from './options.ts';
import type { Ref, RefValue } from './ref.ts';
import { triggers } from './triggers.ts';

function compareNode(b: GraphBuilder, op: InlineOp & { name: string }, cond: unknown): number {
  return b.addInline(op.name, inlineFn(op), [cond]).node;
}

/**
 * Run `body`'s tasks only when `cond`'s value is `value` (strict equality); otherwise they
 * are skipped. Returns what `body` returns (typically refs, to `merge` with another case).
 *
 *   const big = caseOf(isBig, true, () => handleBig(x));
 *   const small = caseOf(isBig, false, () => handleSmall(x));
 *   const out = merge(big, small);
 */
export function caseOf<C, T>(cond: Ref<C> | C, value: C, body: () => T): T {
  const b = requireBuilder('caseOf()');
  const name = `case(${label(value)})`;
  const compare = compareNode(b, { op: 'equals', value, name }, cond);
  const frame = b.beginCase(compare, name);
  try {
    return body();
  } finally {
    b.endCase(frame);
  }
}

/**
 * The result of the first upstream that was not skipped (Prefect's `merge`): the join
 * after `caseOf`/`ifElse`/`switchOn` branches. Runs unless every upstream was skipped.
 */
export function merge<R extends readonly Ref<unknown>[]>(...refs: R): Ref<RefValue<R[number]>> {
  const b = requireBuilder('merge()');
  return b.addInline('merge', inlineFn({ op: 'merge' }), refs, defaultOptions('merge', triggers.notAllSkipped, false)) as Ref<RefValue<R[number]>>;
}

/**
 * Run `whenTrue` only if `cond` is truthy and `whenFalse` only if it is falsy (either may
 * be left out); the other is skipped, with everything downstream of it.
 */
export function ifElse(cond: Ref<unknown>, whenTrue: Ref<unknown> | undefined, whenFalse: Ref<unknown> | undefined): void {
  const b = requireBuilder('ifElse()');
  if (whenTrue !== undefined) b.addDownstream(compareNode(b, { op: 'truthy', value: true, name: 'if(true)' }, cond), [whenTrue]);
  if (whenFalse !== undefined) b.addDownstream(compareNode(b, { op: 'truthy', value: false, name: 'if(false)' }, cond), [whenFalse]);
}

/**
 * Run only the ref whose case matches `cond`'s value; skip the others. With an object,
 * keys are compared with `String(value)` (so `{ 1: a }` matches the number 1); with a Map
 * or a list of pairs, with strict equality.
 *
 *   switchOn(kind, { csv: parseCsv(raw), json: parseJson(raw) });
 */
export function switchOn(
  cond: Ref<unknown>,
  cases: Readonly<Record<string, Ref<unknown>>> | ReadonlyMap<unknown, Ref<unknown>> | readonly (readonly [unknown, Ref<unknown>])[],
): void {
  const b = requireBuilder('switchOn()');
  if (cases instanceof Map || Array.isArray(cases)) {
    for (const [value, ref] of cases as Iterable<readonly [unknown, Ref<unknown>]>) {
      b.addDownstream(compareNode(b, { op: 'equals', value, name: `case(${label(value)})` }, cond), [ref]);
    }
    return;
  }
  for (const [value, ref] of Object.entries(cases as Readonly<Record<string, Ref<unknown>>>)) {
    b.addDownstream(compareNode(b, { op: 'equalsString', value, name: `case(${label(value)})` }, cond), [ref]);
  }
}
