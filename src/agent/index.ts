/**
 * Agents: long-running processes that claim flow runs from the server and start each per
 * its run config. `Agent` is the base (registration, polling, labels, failures, health);
 * `LocalAgent` starts child processes. Docker and Kubernetes agents extend the same base.
 */
export { Agent, type AgentHealth, type AgentKind, type AgentOptions, type AgentStopOptions } from './agent.ts';
export { LocalAgent, WEFT_BIN, type LocalAgentOptions } from './local.ts';
export { LogBatcher, type LogBatcherOptions } from './logs.ts';
