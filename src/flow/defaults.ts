/**
 * Task options with defaults filled in, for code that builds graph specs directly
 * (benchmarks, tests) rather than through `task()`.
 */
import { defaultOptions } from './options.ts';
import type { TaskOptions } from './spec.ts';

export function taskOptions(partial: Partial<TaskOptions> = {}): TaskOptions {
  return { ...defaultOptions(partial.name ?? ''), ...partial };
}
