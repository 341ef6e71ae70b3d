"use strict";
(function () {
  function key(cell) {
    var n = parseFloat(cell.getAttribute("data-v"));
    return isNaN(n) ? Infinity : n;
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () {
      var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      Array.prototype.slice.call(body.rows)
        .sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          return (x === y ? 0 : x < y ? -1 : 1) * (asc ? 1 : -1);
        })
        .forEach(function (row) { body.appendChild(row); });
    });
  });
  document.querySelectorAll("button.copy").forEach(function (button) {
    button.addEventListener("click", function () {
      var code = button.previousElementSibling;
      function select() {
        var range = document.createRange(), sel = window.getSelection();
        range.selectNodeContents(code);
        sel.removeAllRanges();
        sel.addRange(range);
        button.textContent = "selected: press Ctrl+C";
      }
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(code.textContent).then(function () { button.textContent = "copied"; }, select);
      } else {
        select();
      }
    });
  });
})();
