/**
 * The flow model: define tasks, build flows, wire them with refs, map, branch.
 */
export { task, type Task, type BoundTask, type CallOptions } from './task.ts';
export { Flow, flow, parameter, type FlowOptions, type ParameterOptions, type Dependencies } from './flow.ts';
export { caseOf, merge, ifElse, switchOn } from './conditional.ts';
export { triggers, type TriggerBounds, type TriggerFactory, type TriggerInput } from './triggers.ts';
export { unmapped, flatten, type Ref, type RefValue, type Unmapped, type Flatten, type TaskArgs, type MapArgs } from './ref.ts';
export { parseDuration, type Duration, type RetryOnInput, type TaskOptionsInput, type TaskOverrides } from './options.ts';
export type { ParameterType } from './builder.ts';
export { context, type TaskContext } from './context.ts';
export { getTask, hasTask, taskKeys, type TaskDef } from './registry.ts';
export type * from './spec.ts';
