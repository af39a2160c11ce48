require ["regex", "fileinto"];
if header :regex "subject" "^\\[spam\\]" { fileinto "Junk"; }
