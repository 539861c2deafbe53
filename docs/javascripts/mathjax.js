window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// MathJax (vendored in javascripts/mathjax/) typesets the page it is loaded on by itself.
// Material's document$ also emits for that first page: typesetting it again there would
// clear MathJax's character styles after the page was typeset, and leave the maths blank.
// Only a page swapped in later by instant navigation needs a fresh pass, once MathJax is up.
let firstPage = true
document$.subscribe(() => {
  if (firstPage) {
    firstPage = false
    return
  }
  MathJax.startup.promise = MathJax.startup.promise.then(() => {
    MathJax.startup.output.clearCache()
    MathJax.typesetClear()
    MathJax.texReset()
    return MathJax.typesetPromise()
  })
})
