/**
 * One local cluster per test file (a scheduler and two worker processes of two threads
 * each), for suites that run the same cases on every executor. Unref'd, so handle checks
 * see only what an executor leaves behind.
 */
import { LocalCluster } from '../../src/cluster/local-cluster.ts';

export interface SharedCluster {
  /** The running cluster's address (throws when it is not running). */
  address(): string;
  setup(): Promise<void>;
  teardown(): Promise<void>;
}

export function sharedCluster(): SharedCluster {
  let cluster: LocalCluster | null = null;
  return {
    address() {
      if (cluster === null) throw new Error('the test cluster is not running');
      return cluster.address;
    },
    async setup() {
      cluster = await LocalCluster.start({ workers: 2, threads: 2, unref: true });
    },
    async teardown() {
      await cluster?.close();
      cluster = null;
    },
  };
}
