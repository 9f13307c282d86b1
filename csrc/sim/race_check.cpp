// Race and uninitialised-read checks for the CPU simulator (sjd_sim.h), in the spirit of
// compute-sanitizer's racecheck and initcheck.
//
// The kernel sources are compiled with -fsanitize=thread, which makes the compiler call
// __tsan_readN / __tsan_writeN before every load and store; this file, compiled without it, defines
// those hooks (the sanitizer's own runtime is not linked). Each access of a simulated thread to
// shared memory (the dynamic buffer and the kernels' static __shared__ arrays, which the simulator
// keeps in this library's data segment) or to any other memory outside the fibers' stacks (global
// memory: the tensors) is checked against the earlier accesses to the same 4-byte word:
//
// - two accesses by different threads of one block are ordered when a __syncthreads lies between
//   them (the block's barrier count differs), or, for two lanes of one warp, when a warp exchange
//   (__shfl*_sync, __ballot_sync, __reduce_*_sync) both took part in lies between them (a vector
//   clock per lane over the lanes of its warp);
// - threads of different blocks of one launch are never ordered;
// - a write and another access to a common byte, unordered and not both atomic, is a race;
// - a read of shared-memory bytes that no thread of the block has written is an uninitialised read
//   (atomics other than atomicExch read the old value: an atomicAdd to a counter nobody set is one).
//
// Per word the record keeps the last write and up to kReaders reads since it, so a race whose
// earlier access has been pushed out of the record can go unseen (never the other way round: every
// report is a real pair of unordered accesses). Reports name both accesses' source lines
// (addr2line on this library, built with -g); a launch with any report fails like other simulator
// errors. Memory ordering between warps is not modelled beyond this: code that needs a fence
// between a write and another block's read is reported as racing, which is what it is in CUDA too.
#include "sjd_sim.h"

#include <dlfcn.h>
#include <link.h>

#include <cstdio>
#include <set>
#include <tuple>
#include <unordered_map>

namespace sjd_sim {
namespace {

struct Acc {
  uint32_t blk = 0;   // block serial (0: no access recorded)
  uint16_t tid = 0;   // linear thread index in the block
  uint8_t bytes = 0;  // the word's bytes it touched (mask)
  uint8_t atomic = 0;
  uint32_t bep = 0;   // __syncthreads the thread had passed
  uint32_t clk = 0;   // the thread's own entry of its warp clock
  uint32_t pc = 0;    // return address in this library (offset), for the report
};

constexpr int kReaders = 3;

struct Word {
  uint32_t stamp = 0;   // shared memory: the block serial this record belongs to
  uint8_t written = 0;  // shared memory: bytes written by the block
  Acc w;                // last write
  Acc r[kReaders];      // reads since it
};

enum Space { kDyn, kStatic, kGlobal };

struct State {
  uint32_t serial = 0;        // blocks begun, over all launches (0 is "none")
  uint32_t launch_first = 1;  // serial of the launch's first block
  uintptr_t stack_lo = 0, stack_hi = 0;
  uintptr_t dyn_lo = 0, dyn_hi = 0;
  uintptr_t seg_lo = 0, seg_hi = 0;  // this library's writable data (static __shared__ arrays)
  // left out: the simulator's fiber and warp records, and its launch state (g_run: threadIdx,
  // blockIdx ... read by the kernels)
  uintptr_t skip_lo[3] = {0, 0, 0}, skip_hi[3] = {0, 0, 0};
  uintptr_t base = 0;                // this library's load address
  std::string path;                  // and file
  std::vector<Word> dyn, seg;
  std::unordered_map<uintptr_t, Word> glob;
  std::vector<std::string> reports;
  std::set<std::tuple<int, uint32_t, uint32_t>> seen;
  uint64_t n_reports = 0;
};

// Touched only by the thread that holds the launch (sjd_sim.h: g_launch_mutex, g_owner), so a plain
// static: a thread_local here cost a __tls_get_addr call at every checked access.
State S;
bool in_check = false;  // on_access is running

int find_segment(struct dl_phdr_info* info, size_t, void* data) {
  auto* st = static_cast<State*>(data);
  const uintptr_t me = reinterpret_cast<uintptr_t>(&find_segment);
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X) && me >= lo && me < lo + ph.p_memsz) mine = true;
  }
  if (!mine) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_W)) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (st->seg_lo == 0 || lo < st->seg_lo) st->seg_lo = lo & ~uintptr_t(3);
    if (hi > st->seg_hi) st->seg_hi = hi;
  }
  st->base = info->dlpi_addr;
  return 1;
}

void init_once() {
  if (S.base != 0) return;
  dl_iterate_phdr(find_segment, &S);
  Dl_info di;
  if (dladdr(reinterpret_cast<void*>(&find_segment), &di) && di.dli_fname) S.path = di.dli_fname;
  S.seg.assign((S.seg_hi - S.seg_lo) / 4 + 1, Word{});
  S.skip_lo[2] = reinterpret_cast<uintptr_t>(&g_run);
  S.skip_hi[2] = S.skip_lo[2] + sizeof g_run;
}

uint32_t pc_off(const void* pc) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(pc);
  return p > S.base ? static_cast<uint32_t>(p - S.base) : 0;
}

// "FUNC at DIR/FILE:LINE" -> "FILE:LINE (FUNC)", FUNC without namespaces, template arguments or
// parameters
std::string frame(const std::string& ln) {
  const size_t at = ln.rfind(" at ");
  if (at == std::string::npos) return ln;
  std::string fn = ln.substr(0, at), loc = ln.substr(at + 4);
  if (fn.size() > 6 && fn.compare(fn.size() - 6, 6, " const") == 0) fn.resize(fn.size() - 6);
  const size_t slash = loc.rfind('/');
  if (slash != std::string::npos) loc = loc.substr(slash + 1);
  const size_t sp = loc.find(' ');  // " (discriminator N)"
  if (sp != std::string::npos) loc = loc.substr(0, sp);
  std::string bare;
  int depth = 0;
  for (char c : fn) {  // drop <...> and (...) groups
    if (c == '<' || c == '(') ++depth;
    else if (c == '>' || c == ')') --depth;
    else if (depth == 0) bare += c;
  }
  const size_t sep = bare.rfind("::");
  if (sep != std::string::npos) bare = bare.substr(sep + 2);
  const size_t blank = bare.rfind(' ');  // a return type before the name
  if (blank != std::string::npos) bare = bare.substr(blank + 1);
  return loc + " (" + bare + ")";
}

// Source line of a return address in this library, with the first two places it was inlined into.
std::string where(uint32_t pc) {
  char hex[32];
  std::snprintf(hex, sizeof hex, "+0x%x", pc);
  if (pc == 0) return "an unknown place";
  char cmd[1024];
  // the return address follows the call: look up the byte before it
  std::snprintf(cmd, sizeof cmd, "addr2line -f -C -i -p -e '%s' 0x%x 2>/dev/null", S.path.c_str(), pc - 1);
  std::vector<std::string> lines;
  if (FILE* f = popen(cmd, "r")) {
    char buf[1024];
    while (std::fgets(buf, sizeof buf, f)) {
      std::string ln(buf);
      while (!ln.empty() && (ln.back() == '\n' || ln.back() == ' ')) ln.pop_back();
      const size_t inl = ln.find("(inlined by) ");
      if (inl != std::string::npos) ln = ln.substr(inl + 13);
      if (!ln.empty()) lines.push_back(ln);
    }
    pclose(f);
  }
  if (lines.empty() || lines[0][0] == '?') return std::string("library offset ") + hex;
  std::string out = frame(lines[0]);
  for (size_t i = 1; i < lines.size() && i < 3; ++i) out += (i == 1 ? " in " : " < ") + frame(lines[i]);
  return out;
}

inline bool ordered(const Acc& a, const Acc& b) {
  // a (earlier) happens before b (now, by the current thread)
  if (a.blk != b.blk) return false;
  if (a.tid == b.tid || a.bep < b.bep) return true;
  if ((a.tid >> 5) != (b.tid >> 5)) return false;
  const Warp& w = g_run.blk->warps[b.tid >> 5];
  return w.vc[b.tid & 31][a.tid & 31] > a.clk;
}

const char* kind_name(const Acc& a, bool a_write) {
  return a.atomic ? "atomic" : a_write ? "write" : "read";
}

std::string thread_name(const Acc& a) {
  return "thread " + std::to_string(a.tid) + " of block " + std::to_string(a.blk - S.launch_first);
}

// The static __shared__ array holding library offset ``off``, from the library's symbol table.
std::string static_name(uintptr_t off) {
  std::string cmd = "nm -C -S --defined-only '" + S.path + "' 2>/dev/null";
  std::string best;
  if (FILE* f = popen(cmd.c_str(), "r")) {
    char buf[4096];
    while (std::fgets(buf, sizeof buf, f)) {
      unsigned long a = 0, n = 0;
      char type = 0;
      int used = 0;
      if (std::sscanf(buf, "%lx %lx %c %n", &a, &n, &type, &used) < 3 || off < a || off >= a + n) continue;
      std::string name(buf + used);
      while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
      const size_t sep = name.rfind("::");
      best = (sep == std::string::npos ? name : name.substr(sep + 2)) + " + " + std::to_string(off - a);
    }
    pclose(f);
  }
  return best;
}

std::string space_name(Space sp, uintptr_t addr) {
  char buf[96];
  if (sp == kDyn)
    std::snprintf(buf, sizeof buf, "dynamic shared memory, byte %lu", (unsigned long)(addr - S.dyn_lo));
  else if (sp == kStatic) {
    const std::string name = static_name(addr - S.base);
    if (!name.empty()) return "__shared__ " + name;
    std::snprintf(buf, sizeof buf, "a static __shared__ array (library offset 0x%lx)", (unsigned long)(addr - S.base));
  } else
    std::snprintf(buf, sizeof buf, "global memory at %p", reinterpret_cast<void*>(addr));
  return buf;
}

void report_race(Space sp, uintptr_t addr, const Acc& a, bool a_write, const Acc& b, bool b_write) {
  ++S.n_reports;
  if (!S.seen.insert({0, a.pc, b.pc}).second || S.reports.size() >= 8) return;
  std::string what = a.blk != b.blk ? "threads of different blocks of one launch"
                                    : "no __syncthreads or common warp exchange between them";
  S.reports.push_back(std::string("race on ") + space_name(sp, addr) + ": " + kind_name(a, a_write) + " by " +
                      thread_name(a) + " at " + where(a.pc) + "; then " + kind_name(b, b_write) + " by " +
                      thread_name(b) + " at " + where(b.pc) + " (" + what + ")");
}

void report_uninit(Space sp, uintptr_t addr, const Acc& b) {
  ++S.n_reports;
  if (!S.seen.insert({1, b.pc, 0}).second || S.reports.size() >= 8) return;
  S.reports.push_back(std::string("read of ") + space_name(sp, addr) + " that no thread of the block wrote, by " +
                      thread_name(b) + " at " + where(b.pc));
}

// ``reads``: the access reads the word (a read, or an atomic read-modify-write, whose old value
// counts as read for the check of unwritten shared memory).
inline void check_word(Word& wd, Space sp, uintptr_t addr, Acc cur, bool write, bool reads) {
  if (sp != kGlobal && wd.stamp != cur.blk) {
    wd = Word{};
    wd.stamp = cur.blk;
  }
  if (wd.w.blk && (wd.w.bytes & cur.bytes) && !(wd.w.atomic && cur.atomic) && !ordered(wd.w, cur))
    report_race(sp, addr, wd.w, true, cur, write);
  if (write) {
    if (reads && sp != kGlobal && (cur.bytes & ~wd.written)) report_uninit(sp, addr, cur);
    for (Acc& r : wd.r) {
      if (!r.blk || !(r.bytes & cur.bytes)) continue;  // reads of other bytes of the word stay
      if (!(r.atomic && cur.atomic) && !ordered(r, cur)) report_race(sp, addr, r, false, cur, true);
      r = Acc{};
    }
    wd.w = cur;
    wd.written |= cur.bytes;
    return;
  }
  if (sp != kGlobal && (cur.bytes & ~wd.written)) report_uninit(sp, addr, cur);
  // keep the read: in its own thread's slot, a free one, or one ordered before it (a later write
  // ordered after this read is then ordered after that one too)
  int slot = -1;
  for (int i = 0; i < kReaders && slot < 0; ++i)
    if (wd.r[i].blk == cur.blk && wd.r[i].tid == cur.tid) slot = i;
  for (int i = 0; i < kReaders && slot < 0; ++i)
    if (!wd.r[i].blk || ordered(wd.r[i], cur)) slot = i;
  if (slot < 0) slot = static_cast<int>(cur.tid % kReaders);
  wd.r[slot] = cur;
}

inline void on_access(const void* p, unsigned size, bool write, bool atomic, const void* pc, bool atomic_reads = true) {
  // host code of another thread, or the checker's own code: the C++ library's inline functions it
  // calls (std::string ...) may be the instrumented copies the kernel sources instantiated
  if (!this_thread_runs_the_launch() || in_check) return;
  Fiber* f = g_run.cur;
  if (f == nullptr || g_run.blk == nullptr || size == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a >= S.stack_lo && a < S.stack_hi) return;  // a thread's own frame
  for (int i = 0; i < 3; ++i)
    if (a >= S.skip_lo[i] && a < S.skip_hi[i]) return;
  Space sp = kGlobal;
  if (a >= S.dyn_lo && a < S.dyn_hi) sp = kDyn;
  else if (a >= S.seg_lo && a < S.seg_hi) sp = kStatic;
  Acc cur;
  cur.blk = S.serial;
  cur.tid = static_cast<uint16_t>(f->linear);
  cur.atomic = atomic;
  cur.bep = static_cast<uint32_t>(g_run.blk->bar.gen);
  cur.clk = g_run.blk->warps[f->linear >> 5].vc[f->linear & 31][f->linear & 31];
  cur.pc = pc_off(pc);
  const uintptr_t end = a + size;
  in_check = true;
  for (uintptr_t w = a & ~uintptr_t(3); w < end; w += 4) {
    unsigned mask = 0;
    for (unsigned k = 0; k < 4; ++k)
      if (w + k >= a && w + k < end) mask |= 1u << k;
    cur.bytes = static_cast<uint8_t>(mask);
    Word* wd;
    if (sp == kDyn) wd = &S.dyn[(w - S.dyn_lo) / 4];
    else if (sp == kStatic) wd = &S.seg[(w - S.seg_lo) / 4];
    else wd = &S.glob[w];
    check_word(*wd, sp, w, cur, write || atomic, !write || (atomic && atomic_reads));
  }
  in_check = false;
}

}  // namespace

void race_launch_begin(const unsigned char* dyn, size_t smem) {
  init_once();
  S.dyn_lo = reinterpret_cast<uintptr_t>(dyn);
  S.dyn_hi = S.dyn_lo + smem;
  if (S.dyn.size() < smem / 4 + 1) S.dyn.resize(smem / 4 + 1);
  S.glob.clear();
  S.reports.clear();
  S.seen.clear();
  S.n_reports = 0;
  S.launch_first = S.serial + 1;
}

void race_block_begin(const Block& blk, const char* stack_lo, size_t stack_bytes) {
  ++S.serial;
  S.stack_lo = reinterpret_cast<uintptr_t>(stack_lo);
  S.stack_hi = S.stack_lo + stack_bytes;
  S.skip_lo[0] = reinterpret_cast<uintptr_t>(blk.fibers.data());
  S.skip_hi[0] = S.skip_lo[0] + blk.fibers.size() * sizeof(Fiber);
  S.skip_lo[1] = reinterpret_cast<uintptr_t>(blk.warps.data());
  S.skip_hi[1] = S.skip_lo[1] + blk.warps.size() * sizeof(Warp);
}

void race_warp_event(Warp& w, unsigned lanes) {
  uint32_t m[32] = {};
  for (int p = 0; p < 32; ++p) {
    if (!((lanes >> p) & 1u)) continue;
    ++w.vc[p][p];
    for (int k = 0; k < 32; ++k) m[k] = std::max(m[k], w.vc[p][k]);
  }
  for (int p = 0; p < 32; ++p)
    if ((lanes >> p) & 1u) std::memcpy(w.vc[p], m, sizeof m);
}

void race_atomic(const void* p, size_t n, const void* pc, bool reads) {
  on_access(p, static_cast<unsigned>(n), true, true, pc, reads);
}

std::string race_launch_end() {
  S.dyn_lo = S.dyn_hi = 0;
  S.stack_lo = S.stack_hi = 0;
  S.glob.clear();
  if (S.n_reports == 0) return std::string();
  std::string out = "race check: " + std::to_string(S.n_reports) + " report(s)";
  if (S.n_reports > S.reports.size()) out += " (the first " + std::to_string(S.reports.size()) + " distinct shown)";
  for (const auto& r : S.reports) out += "\n  " + r;
  S.reports.clear();
  return out;
}

}  // namespace sjd_sim

// ---- the hooks the instrumented kernel sources call ------------------------------------------------
#define SJD_HOOK __attribute__((visibility("hidden")))
extern "C" {
SJD_HOOK void __tsan_init() {}
SJD_HOOK void __tsan_func_entry(void*) {}
SJD_HOOK void __tsan_func_exit() {}
#define SJD_RW(n)                                                                                     \
  SJD_HOOK void __tsan_read##n(void* p) { sjd_sim::on_access(p, n, false, false, __builtin_return_address(0)); } \
  SJD_HOOK void __tsan_write##n(void* p) { sjd_sim::on_access(p, n, true, false, __builtin_return_address(0)); } \
  SJD_HOOK void __tsan_unaligned_read##n(void* p) {                                                   \
    sjd_sim::on_access(p, n, false, false, __builtin_return_address(0));                              \
  }                                                                                                   \
  SJD_HOOK void __tsan_unaligned_write##n(void* p) {                                                  \
    sjd_sim::on_access(p, n, true, false, __builtin_return_address(0));                               \
  }
SJD_RW(1)
SJD_RW(2)
SJD_RW(4)
SJD_RW(8)
SJD_RW(16)
#undef SJD_RW
SJD_HOOK void __tsan_read_range(void* p, unsigned long n) {
  sjd_sim::on_access(p, static_cast<unsigned>(n), false, false, __builtin_return_address(0));
}
SJD_HOOK void __tsan_write_range(void* p, unsigned long n) {
  sjd_sim::on_access(p, static_cast<unsigned>(n), true, false, __builtin_return_address(0));
}
SJD_HOOK void __tsan_vptr_update(void**, void*) {}
SJD_HOOK void __tsan_vptr_read(void**) {}
// Atomics of host code in the instrumented files (function-local statics' guards): carried out,
// not checked. The kernels' atomics are the simulator's (race_atomic).
#define SJD_ATOMIC_LS(bits, T)                                                                        \
  SJD_HOOK T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  SJD_HOOK void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  SJD_HOOK T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                             \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                \
  }
SJD_ATOMIC_LS(8, unsigned char)
SJD_ATOMIC_LS(16, unsigned short)
SJD_ATOMIC_LS(32, int)
SJD_ATOMIC_LS(64, long)
#undef SJD_ATOMIC_LS
SJD_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
SJD_HOOK void __tsan_atomic_signal_fence(int) {}
}
