/**
 * Default task options, and a helper to fill them in: used by the flow model, and by
 * code that builds graph specs directly (benchmarks, tests).
 */
import type { TaskOptions } from './spec.ts';

export const DEFAULT_TASK_OPTIONS: TaskOptions = Object.freeze<TaskOptions>({
  name: '',
  tags: [],
  maxRetries: 0,
  retryDelayMs: 0,
  retryOn: null,
  timeoutMs: 0,
  trigger: { kind: 'builtin', name: 'allSuccessful' },
  skipOnUpstreamSkip: true,
  cacheForMs: 0,
  cacheValidator: 'durationOnly',
  cacheKey: null,
  checkpoint: false,
  result: null,
  stateHandlers: [],
  onFailure: null,
  priority: 0,
  resources: {},
});

export function taskOptions(partial: Partial<TaskOptions> = {}): TaskOptions {
  return { ...DEFAULT_TASK_OPTIONS, ...partial };
}
