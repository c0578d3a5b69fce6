/**
 * The ready queue: a binary min-heap of task ids in a growable Int32Array, ordered by
 * (rank[id], order[id]) — rank is the negated user priority, order the static
 * memory-minimising order. No allocation per push or pop.
 */
export class ReadyHeap {
  private ids: Int32Array;
  size = 0;

  constructor(
    private rank: Float64Array,
    private order: Float64Array,
    capacity = 1024,
  ) {
    this.ids = new Int32Array(Math.max(16, capacity));
  }

  /** The core grows its per-task arrays; the heap must compare against the new ones. */
  rebind(rank: Float64Array, order: Float64Array): void {
    this.rank = rank;
    this.order = order;
  }

  private less(a: number, b: number): boolean {
    const ra = this.rank[a]!;
    const rb = this.rank[b]!;
    return ra < rb || (ra === rb && this.order[a]! < this.order[b]!);
  }

  push(id: number): void {
    if (this.size === this.ids.length) {
      const next = new Int32Array(this.ids.length * 2);
      next.set(this.ids);
      this.ids = next;
    }
    const ids = this.ids;
    let i = this.size++;
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
    const ids = this.ids;
    const top = ids[0]!;
    const last = ids[--this.size]!;
    const n = this.size;
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
    return this.size === 0 ? -1 : this.ids[0]!;
  }

  /** Remove every entry (cancellation). */
  clear(): void {
    this.size = 0;
  }

  /** For validation: whether id is queued (linear scan). */
  has(id: number): boolean {
    for (let i = 0; i < this.size; i++) if (this.ids[i] === id) return true;
    return false;
  }

  /** Bytes held (for heap-per-task reports). */
  bytes(): number {
    return this.ids.byteLength;
  }
}
