// mrt_fast._native: CPU-side hot spots of mrt-fast, in plain CPython C API (no build deps).
//
// first_invalid_token(tokens) -> index or -1
//   Fast path of token-list validation (mrt_fast.packing.groups._check_token_list, whose Python
//   loop is the reference and produces the error messages).
//
// group_by_prefix(sequences) -> [(shared_prefix_len, [input indices]), ...]
//   The native core of mrt_fast.packing.find_shared_prefixes; the docstring of the pure-Python
//   reference (mrt_fast.packing.prefix_finder.group_by_prefix_reference) explains the grouping.
//   The sort differs (a multikey quicksort instead of Python's stable sort: equal sequences may
//   come out in another order), but it yields the same prefix trie; the LCP-interval sweep, the
//   tie rule and the output order are the reference's, so the output is identical. Tests check
//   the two agree on random inputs.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

struct Interval {   // an open LCP interval on the sweep stack
  int64_t depth;
  Py_ssize_t left;
  int64_t min_len;        // shortest member so far
  int64_t children_best;  // sum of the best savings of finished child intervals
};

struct Finished {   // a closed interval, in post-order
  Py_ssize_t left, right;
  int64_t shared;
  bool take;
};

constexpr int64_t kEnd = INT64_MIN;  // key past a sequence's end: sorts first, as Python's shorter-list-first

// Value of a token object. Identity is checked by the callers first (tokens copied from one
// prompt list share their int objects), so this runs only where objects differ.
inline bool token_value(PyObject* obj, int64_t* out) {
  // Fast path for the common case, a small exact int (every token id of a real vocabulary):
  // read its single digit inline instead of calling into libpython.
#if PY_VERSION_HEX >= 0x030C0000
  if (PyLong_CheckExact(obj) && PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(obj))) {
    const Py_ssize_t v = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(obj));
    if (v >= 0) {
      *out = v;
      return true;
    }
  }
#else
  if (PyLong_CheckExact(obj)) {
    const Py_ssize_t size = Py_SIZE(obj);
    if (size == 0 || size == 1) {
      *out = size ? static_cast<int64_t>(reinterpret_cast<PyLongObject*>(obj)->ob_digit[0]) : 0;
      return true;
    }
  }
#endif
  if (!PyLong_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "token ids must be ints, got %s", Py_TYPE(obj)->tp_name);
    return false;
  }
  long long v = PyLong_AsLongLong(obj);
  if ((v == -1 && PyErr_Occurred()) || v < 0) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "token ids must be non-negative ints that fit in 64 bits");
    return false;
  }
  *out = v;
  return true;
}

// Multikey quicksort (Bentley & Sedgewick) of sequence indices, straight on the Python lists'
// item arrays. Each column is read once per partition step, so shared prefixes are walked about
// once instead of once per comparison, and tokens past the distinguishing prefix are never read.
// The LCP of sorted neighbours falls out of the partition boundaries. The order among equal
// sequences differs from Python's stable sort, which the grouping does not depend on.
struct PrefixSorter {
  std::vector<PyObject**> items;
  std::vector<int64_t> lens;
  std::vector<Py_ssize_t> order;
  std::vector<int64_t> lcp;  // lcp[k]: longest common prefix of order[k-1] and order[k]
  bool failed = false;

  bool key(Py_ssize_t seq, int64_t d, int64_t* out) {
    if (d >= lens[seq]) {
      *out = kEnd;
      return true;
    }
    return token_value(items[seq][d], out);
  }

  // How many tokens from depth d on all sequences in [lo, hi) share. Walks each sequence along
  // the first one (row-wise, cache-friendly), never further than the shortest agreement so far.
  // Tokens copied from one prompt share int objects, so most checks are a pointer compare.
  bool common_extension(Py_ssize_t lo, Py_ssize_t hi, int64_t d, int64_t* ext) {
    const Py_ssize_t first = order[lo];
    PyObject** a = items[first];
    int64_t limit = lens[first];
    for (Py_ssize_t k = lo + 1; k < hi && limit > d; ++k) {
      const Py_ssize_t s = order[k];
      PyObject** b = items[s];
      int64_t j = d, stop = std::min(limit, lens[s]);
      while (j < stop) {
        if (a[j] != b[j]) {
          int64_t va, vb;
          if (!token_value(a[j], &va) || !token_value(b[j], &vb)) return false;
          if (va != vb) break;
        }
        ++j;
      }
      limit = j;
    }
    *ext = limit - d;
    return true;
  }

  void sort(Py_ssize_t lo, Py_ssize_t hi, int64_t d) {
    std::vector<int64_t> keys;
    while (hi - lo > 1 && !failed) {
      int64_t ext = 0;
      if (!common_extension(lo, hi, d, &ext)) {
        failed = true;
        return;
      }
      d += ext;  // all of [lo, hi) agree up to d; partition on token d (or its end)
      keys.resize(hi - lo);
      for (Py_ssize_t k = lo; k < hi; ++k)
        if (!key(order[k], d, &keys[k - lo])) {
          failed = true;
          return;
        }
      // Median-of-three pivot, then a three-way (Dutch flag) partition of order and keys together.
      int64_t a = keys[0], b = keys[(hi - lo) / 2], c = keys[hi - lo - 1];
      const int64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
      Py_ssize_t lt = lo, i = lo, gt = hi;
      while (i < gt) {
        const int64_t v = keys[i - lo];
        if (v < pivot) {
          std::swap(order[lt], order[i]);
          std::swap(keys[lt - lo], keys[i - lo]);
          ++lt;
          ++i;
        } else if (v > pivot) {
          --gt;
          std::swap(order[gt], order[i]);
          std::swap(keys[gt - lo], keys[i - lo]);
        } else {
          ++i;
        }
      }
      // Neighbours across a partition boundary agree on d tokens and differ at token d.
      if (lt > lo) {
        sort(lo, lt, d);
        lcp[lt] = d;
      }
      if (gt < hi) {
        sort(gt, hi, d);
        lcp[gt] = d;
      }
      if (pivot == kEnd) {  // the middle block is identical sequences of length d
        for (Py_ssize_t k = lt + 1; k < gt; ++k) lcp[k] = d;
        return;
      }
      lo = lt;
      hi = gt;
      ++d;
    }
  }
};

PyObject* group_by_prefix(PyObject*, PyObject* arg) {
  PyObject* seqs = PySequence_Fast(arg, "sequences must be a list of token lists");
  if (seqs == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seqs);
  PyObject** outer = PySequence_Fast_ITEMS(seqs);
  PrefixSorter sorter;
  sorter.items.resize(n);
  sorter.lens.resize(n);
  std::vector<PyObject*> inner(n, nullptr);  // owned references (lists are borrowed as is)
  auto release = [&]() {
    for (PyObject* o : inner) Py_XDECREF(o);
    Py_DECREF(seqs);
  };
  for (Py_ssize_t i = 0; i < n; ++i) {
    inner[i] = PySequence_Fast(outer[i], "each sequence must be a list of token ids");
    if (inner[i] == nullptr) {
      release();
      return nullptr;
    }
    sorter.items[i] = PySequence_Fast_ITEMS(inner[i]);
    sorter.lens[i] = PySequence_Fast_GET_SIZE(inner[i]);
  }
  sorter.order.resize(n);
  std::iota(sorter.order.begin(), sorter.order.end(), 0);
  sorter.lcp.assign(n, 0);
  sorter.sort(0, n, 0);
  release();  // nothing below touches the token objects
  if (sorter.failed) return nullptr;
  const std::vector<Py_ssize_t>& order = sorter.order;
  const std::vector<int64_t>& lcp = sorter.lcp;
  const std::vector<int64_t>& lens = sorter.lens;
  auto length = [&](Py_ssize_t i) { return lens[i]; };

  // LCP-interval sweep and top-down choice, exactly as in the Python reference.
  std::vector<Finished> finished;
  std::vector<Interval> stack;
  stack.push_back({0, 0, n ? length(order[0]) : 0, 0});
  auto finish = [&](const Interval& node, Py_ssize_t right) {
    int64_t shared = std::min(node.depth, node.min_len - 1);
    int64_t take_value = static_cast<int64_t>(right - node.left) * shared;
    finished.push_back({node.left, right, shared, shared > 0 && take_value >= node.children_best});
    return std::max(take_value, node.children_best);
  };
  for (Py_ssize_t i = 1; i <= n; ++i) {
    int64_t h = i < n ? lcp[i] : 0;
    Py_ssize_t left = i - 1;
    bool has_popped = false;
    int64_t popped_best = 0, popped_min = 0;
    while (h < stack.back().depth) {
      Interval node = stack.back();
      stack.pop_back();
      int64_t best = finish(node, i - 1);
      left = node.left;
      if (h <= stack.back().depth) {
        stack.back().children_best += best;
        stack.back().min_len = std::min(stack.back().min_len, node.min_len);
        has_popped = false;
      } else {
        has_popped = true;
        popped_best = best;
        popped_min = node.min_len;
      }
    }
    if (h > stack.back().depth) {
      int64_t min_len = length(order[i - 1]);
      int64_t children_best = 0;
      if (has_popped) {
        children_best = popped_best;
        min_len = std::min(min_len, popped_min);
      }
      stack.push_back({h, left, min_len, children_best});
    }
    if (i < n) stack.back().min_len = std::min(stack.back().min_len, length(order[i]));
  }

  std::vector<char> covered(n, 0);
  std::vector<std::pair<int64_t, std::vector<Py_ssize_t>>> groups;
  for (auto it = finished.rbegin(); it != finished.rend(); ++it) {
    if (!it->take || covered[it->left]) continue;
    std::vector<Py_ssize_t> members(order.begin() + it->left, order.begin() + it->right + 1);
    for (Py_ssize_t i = it->left; i <= it->right; ++i) covered[i] = 1;
    std::sort(members.begin(), members.end());
    groups.emplace_back(it->shared, std::move(members));
  }
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!covered[i]) groups.push_back({0, {order[i]}});
  std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a.second[0] < b.second[0]; });

  PyObject* result = PyList_New(static_cast<Py_ssize_t>(groups.size()));
  if (result == nullptr) return nullptr;
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& members = groups[g].second;
    PyObject* indices = PyList_New(static_cast<Py_ssize_t>(members.size()));
    if (indices == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    for (size_t k = 0; k < members.size(); ++k) {
      PyObject* idx = PyLong_FromSsize_t(members[k]);
      if (idx == nullptr) {
        Py_DECREF(indices);
        Py_DECREF(result);
        return nullptr;
      }
      PyList_SET_ITEM(indices, static_cast<Py_ssize_t>(k), idx);
    }
    PyObject* item = Py_BuildValue("(LN)", static_cast<long long>(groups[g].first), indices);
    if (item == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(g), item);
  }
  return result;
}

// first_invalid_token(tokens: list) -> index of the first item that is not a non-negative exact
// int, or -1. The fast path of token-list validation; Python builds the error message.
PyObject* first_invalid_token(PyObject*, PyObject* arg) {
  if (!PyList_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "first_invalid_token expects a list");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(arg);
  PyObject** items = PySequence_Fast_ITEMS(arg);
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t value;
    // Exact ints only: bool (an int subclass) is never a token id.
    if (!PyLong_CheckExact(items[i]) || !token_value(items[i], &value)) {
      PyErr_Clear();
      return PyLong_FromSsize_t(i);
    }
  }
  return PyLong_FromLong(-1);
}

PyMethodDef methods[] = {
    {"first_invalid_token", first_invalid_token, METH_O,
     "first_invalid_token(tokens: list) -> index of the first item that is not a non-negative int, or -1."},
    {"group_by_prefix", group_by_prefix, METH_O,
     "group_by_prefix(sequences) -> [(shared_prefix_len, [input indices]), ...]\n\n"
     "Native core of mrt_fast.packing.find_shared_prefixes (same output as the Python reference)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "mrt_fast._native",
                      "Native CPU hot spots of mrt-fast (optional; pure-Python references exist).", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
