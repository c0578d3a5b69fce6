export { SchedulerCore, SchedulerError, type CoreOptions, type FailureKind, type Instruction, type RunState } from './core.ts';
export * as states from './states.ts';
export { staticOrder } from './order.ts';
