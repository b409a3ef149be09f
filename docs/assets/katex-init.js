// Renders the equations that pymdownx.arithmatex (generic mode) leaves in <span class="arithmatex">
// and <div class="arithmatex">, with the KaTeX files vendored beside this one: no CDN is needed.
function dpoDsRenderMath() {
  document.querySelectorAll(".arithmatex").forEach(function (el) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\[", right: "\\]", display: true },
        { left: "\\(", right: "\\)", display: false },
      ],
      throwOnError: false,
    });
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(dpoDsRenderMath);  // Material's instant navigation re-renders each page
} else {
  document.addEventListener("DOMContentLoaded", dpoDsRenderMath);
}
