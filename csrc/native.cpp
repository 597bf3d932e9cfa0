// mrt_fast._native: CPU-side hot spots of mrt-fast, in plain CPython C API (no build deps).
//
// group_by_prefix(sequences) -> [(shared_prefix_len, [input indices]), ...]
//   The native core of mrt_fast.packing.find_shared_prefixes. It mirrors the pure-Python
//   reference mrt_fast.packing.prefix_finder.group_by_prefix_reference step for step (same sort
//   order, same LCP-interval sweep, same tie rule), so both return identical output; the
//   docstring there explains the grouping. Tests check the two agree on random inputs.

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

// Copy the token lists into one flat int64 buffer. Returns false with a Python error set.
bool read_sequences(PyObject* seqs, std::vector<int64_t>& tokens, std::vector<Py_ssize_t>& offsets) {
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seqs);
  PyObject** items = PySequence_Fast_ITEMS(seqs);
  offsets.assign(n + 1, 0);
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_ssize_t len = PyObject_Length(items[i]);
    if (len < 0) {
      PyErr_Format(PyExc_TypeError, "sequences[%zd] must be a list of token ids", i);
      return false;
    }
    offsets[i + 1] = offsets[i] + len;
  }
  tokens.resize(offsets[n]);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* seq = PySequence_Fast(items[i], "sequences[i] must be a list of token ids");
    if (seq == nullptr) return false;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (len != offsets[i + 1] - offsets[i]) {  // a sequence that changed length while we read it
      Py_DECREF(seq);
      PyErr_Format(PyExc_ValueError, "sequences[%zd] changed length while reading", i);
      return false;
    }
    PyObject** toks = PySequence_Fast_ITEMS(seq);
    int64_t* out = tokens.data() + offsets[i];
    for (Py_ssize_t j = 0; j < len; ++j) {
      if (!PyLong_Check(toks[j])) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_TypeError, "sequences[%zd][%zd] must be an int token id, got %s", i, j,
                     Py_TYPE(toks[j])->tp_name);
        return false;
      }
      long long v = PyLong_AsLongLong(toks[j]);
      if (v == -1 && PyErr_Occurred()) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "sequences[%zd][%zd] does not fit in a 64-bit token id", i, j);
        return false;
      }
      out[j] = v;
    }
    Py_DECREF(seq);
  }
  return true;
}

PyObject* group_by_prefix(PyObject*, PyObject* arg) {
  PyObject* seqs = PySequence_Fast(arg, "sequences must be a list of token lists");
  if (seqs == nullptr) return nullptr;
  std::vector<int64_t> tokens;
  std::vector<Py_ssize_t> offsets;
  if (!read_sequences(seqs, tokens, offsets)) {
    Py_DECREF(seqs);
    return nullptr;
  }
  Py_DECREF(seqs);
  const Py_ssize_t n = static_cast<Py_ssize_t>(offsets.size()) - 1;
  auto begin = [&](Py_ssize_t i) { return tokens.data() + offsets[i]; };
  auto end = [&](Py_ssize_t i) { return tokens.data() + offsets[i + 1]; };
  auto length = [&](Py_ssize_t i) { return static_cast<int64_t>(offsets[i + 1] - offsets[i]); };

  std::vector<Py_ssize_t> order(n);
  std::vector<int64_t> lcp(n, 0);
  std::vector<Finished> finished;
  {
    // The sort and sweep touch no Python objects: release the GIL.
    Py_BEGIN_ALLOW_THREADS
    std::iota(order.begin(), order.end(), 0);
    // Stable lexicographic sort, as Python's sorted() on lists (equal sequences keep input order).
    std::stable_sort(order.begin(), order.end(), [&](Py_ssize_t a, Py_ssize_t b) {
      return std::lexicographical_compare(begin(a), end(a), begin(b), end(b));
    });
    for (Py_ssize_t i = 1; i < n; ++i) {
      const int64_t *a = begin(order[i - 1]), *b = begin(order[i]);
      int64_t limit = std::min(length(order[i - 1]), length(order[i])), j = 0;
      while (j < limit && a[j] == b[j]) ++j;
      lcp[i] = j;
    }

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
    Py_END_ALLOW_THREADS
  }

  // Top-down selection (ancestors before descendants), then leftover singletons.
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
  std::stable_sort(groups.begin(), groups.end(),
                   [](const auto& a, const auto& b) { return a.second[0] < b.second[0]; });

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

PyMethodDef methods[] = {
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
