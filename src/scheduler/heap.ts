/**
 * The ready queue, ordered by (rank[id], order[id]) — rank is the negated user priority,
 * order the static memory-minimising order. Smallest first. No allocation per push or pop.
 *
 * Two sources, merged at pop:
 *
 * - a sorted *run*: a FIFO of ids whose keys arrived in non-decreasing order. A push whose
 *   key is not below the run's tail is appended in O(1). Graphs that release tasks in key
 *   order (the leaves of a reduction at `start()`, independent tasks, a chain) never
 *   touch the heap at all;
 * - a binary min-heap in a growable Int32Array for everything else (a reduction's
 *   parents, which become ready behind the remaining leaves, stay few).
 *
 * `pop()` takes the smaller of the two heads, so the order is exactly the one a single
 * heap gives (keys are unique: order is a permutation of the tasks), while pushes and
 * pops of keys that arrive in order cost O(1) instead of O(log n).
 *
 * When every task has the same rank (no user priorities: the usual case) comparisons
 * read `order` only.
 */
export class ReadyHeap {
  private ids: Int32Array;
  /** Entries in the binary heap (ids[0..heapSize)). */
  private heapSize = 0;
  private run: Int32Array;
  /** The run is run[runHead..runTail), keys non-decreasing. */
  private runHead = 0;
  private runTail = 0;
  /** Every task has the same rank: compare `order` alone. */
  private uniform = false;
  /** Entries in both sources. */
  size = 0;

  constructor(
    private rank: Float64Array,
    private order: Float64Array,
    capacity = 1024,
  ) {
    this.ids = new Int32Array(Math.max(16, capacity));
    this.run = new Int32Array(Math.max(16, capacity));
  }

  /** The core grows its per-task arrays; the heap must compare against the new ones. */
  rebind(rank: Float64Array, order: Float64Array): void {
    this.rank = rank;
    this.order = order;
  }

  /**
   * Promise that every task pushed from now on has the same rank (the core knows this
   * when no node sets a priority; mapped children inherit their parent's rank).
   */
  setUniformRank(uniform: boolean): void {
    this.uniform = uniform;
  }

  private less(a: number, b: number): boolean {
    const order = this.order;
    if (this.uniform) return order[a]! < order[b]!;
    const ra = this.rank[a]!;
    const rb = this.rank[b]!;
    return ra < rb || (ra === rb && order[a]! < order[b]!);
  }

  push(id: number): void {
    this.size++;
    const tail = this.runTail;
    if (tail === this.runHead) {
      // Empty run: start a new one at the front.
      this.runHead = 0;
      this.runTail = 1;
      this.run[0] = id;
      return;
    }
    if (!this.less(id, this.run[tail - 1]!)) {
      if (tail === this.run.length) this.makeRoom();
      this.run[this.runTail++] = id;
      return;
    }
    this.heapPush(id);
  }

  private makeRoom(): void {
    const used = this.runTail - this.runHead;
    if (this.runHead >= this.run.length >> 1) {
      this.run.copyWithin(0, this.runHead, this.runTail);
    } else {
      const next = new Int32Array(this.run.length * 2);
      next.set(this.run.subarray(this.runHead, this.runTail));
      this.run = next;
    }
    this.runHead = 0;
    this.runTail = used;
  }

  private heapPush(id: number): void {
    if (this.heapSize === this.ids.length) {
      const next = new Int32Array(this.ids.length * 2);
      next.set(this.ids);
      this.ids = next;
    }
    const ids = this.ids;
    let i = this.heapSize++;
    while (i > 0) {
      const p = (i - 1) >> 1;
      const pid = ids[p]!;
      if (!this.less(id, pid)) break;
      ids[i] = pid;
      i = p;
    }
    ids[i] = id;
  }

  /** Smallest id, or -1 when empty. */
  pop(): number {
    if (this.size === 0) return -1;
    this.size--;
    if (this.runHead < this.runTail) {
      const r = this.run[this.runHead]!;
      if (this.heapSize === 0 || this.less(r, this.ids[0]!)) {
        this.runHead++;
        return r;
      }
    }
    return this.heapPop();
  }

  private heapPop(): number {
    const ids = this.ids;
    const top = ids[0]!;
    const n = --this.heapSize;
    const last = ids[n]!;
    if (n > 0) {
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= n) break;
        const r = l + 1;
        let c = l;
        if (r < n && this.less(ids[r]!, ids[l]!)) c = r;
        if (!this.less(ids[c]!, last)) break;
        ids[i] = ids[c]!;
        i = c;
      }
      ids[i] = last;
    }
    return top;
  }

  peek(): number {
    if (this.size === 0) return -1;
    if (this.runHead < this.runTail) {
      const r = this.run[this.runHead]!;
      if (this.heapSize === 0 || this.less(r, this.ids[0]!)) return r;
    }
    return this.ids[0]!;
  }

  /** Remove every entry (cancellation). */
  clear(): void {
    this.size = 0;
    this.heapSize = 0;
    this.runHead = 0;
    this.runTail = 0;
  }

  /** For validation: whether id is queued (linear scan). */
  has(id: number): boolean {
    for (let i = 0; i < this.heapSize; i++) if (this.ids[i] === id) return true;
    for (let i = this.runHead; i < this.runTail; i++) if (this.run[i] === id) return true;
    return false;
  }

  /** Bytes held (for heap-per-task reports). */
  bytes(): number {
    return this.ids.byteLength + this.run.byteLength;
  }
}
